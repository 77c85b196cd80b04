"""Reporting: result tables from `metrics.json` files and routing figures."""
