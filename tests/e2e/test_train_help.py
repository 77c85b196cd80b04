"""``ldmole-train --help`` (a subprocess) lists every key with its default and meaning."""

from __future__ import annotations


import pytest

from ldmole.experiment.run_config import describe_keys, format_value
from tests.helpers import run_command


@pytest.mark.slow
def test_train_help_lists_every_key_with_its_default_and_meaning():
    result = run_command("ldmole.cli.train", ["--help"], timeout=60)
    assert result.returncode == 0
    for key, default, help_text in describe_keys():
        assert f"  {key}={format_value(default)}\n      {help_text}\n" in result.stdout + "\n", \
            f"--help must list {key} with its default as typed and its help text"
    assert "mole.lambda_bias_init=-2.5\n" in result.stdout and "sparsity_coef=0.0\n" in result.stdout
