"""Command-line entry points: the console scripts `ldmole-*` (pyproject.toml's [project.scripts] names each one's
module, which also runs as `python -m <module>`)."""
