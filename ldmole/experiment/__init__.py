"""Experiment code: task data and prompts, base models, run configuration, the training loop,
evaluation, checkpoints and routing statistics."""
