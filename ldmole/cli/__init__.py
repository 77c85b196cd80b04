"""Command-line entry points (console scripts `ldmole-*`, or `python -m ldmole.cli.<name>`)."""
