"""What the launcher decides: the per-device batch follows the process count, the precision is the
launcher's unless the run sets it, and every documented launch command's batch arithmetic works."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from ldmole.experiment.launch import default_per_device_batch, gradient_accumulation, resolve_launch
from ldmole.experiment.run_config import compose_config
from ldmole.experiment.trainer import make_accelerator

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").glob("**/*.yaml"))]


@pytest.mark.parametrize("batch, processes, expected", [(16, 1, 4), (16, 2, 4), (16, 4, 4), (16, 8, 2), (16, 16, 1),
                                                       (6, 1, 3), (9, 1, 3), (32, 8, 4), (7, 1, 1)])
def test_default_per_device_batch_is_the_largest_divisor_up_to_4(batch, processes, expected):
    per_device = default_per_device_batch(batch, processes)
    assert per_device == expected
    assert (batch // processes) % per_device == 0


def test_a_batch_that_does_not_split_over_the_processes_names_the_fix():
    with pytest.raises(ValueError, match=r"batch_size=12 cannot be split evenly over 8 processes: set batch_size to "
                                         r"a multiple of 8"):
        default_per_device_batch(12, 8)


def test_resolve_launch_fills_only_what_the_run_left_null():
    config = compose_config(["model=tiny_qwen3"])
    assert config.optim.per_device_batch_size is None and config.optim.mixed_precision is None
    resolved = resolve_launch(config, num_processes=8, launcher_precision="bf16")
    assert (resolved.optim.per_device_batch_size, resolved.optim.mixed_precision) == (2, "bf16")
    assert config.optim.per_device_batch_size is None, "the given config is left as it was"
    fixed = compose_config(["model=tiny_qwen3", "per_device_batch_size=1", "mixed_precision=no"])
    resolved = resolve_launch(fixed, num_processes=8, launcher_precision="bf16")
    assert (resolved.optim.per_device_batch_size, resolved.optim.mixed_precision) == (1, "no")
    with pytest.raises(ValueError, match="batch_size=16 is not a multiple of per_device_batch_size=4 x 8 processes"):
        resolve_launch(compose_config(["model=tiny_qwen3", "per_device_batch_size=4"]), 8, "no")
    with pytest.raises(ValueError, match="the launcher asks for mixed_precision='fp8'"):
        resolve_launch(config, 1, "fp8")
    with pytest.raises(ValueError, match="mixed_precision=fp16 needs a GPU: on a CPU accelerate trains in float32"):
        resolve_launch(config, 1, "fp16", device_type="cpu")
    assert resolve_launch(config, 1, "fp16", device_type="cuda").optim.mixed_precision == "fp16"


@pytest.mark.parametrize("env, keys, expected", [
    ({}, [], "no"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, [], "bf16"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ["mixed_precision=no"], "no"),
    ({}, ["mixed_precision=bf16"], "bf16"),
])
def test_the_launchers_precision_holds_unless_the_run_sets_one(monkeypatch, tmp_path, env, keys, expected):
    """``accelerate launch --mixed_precision bf16`` (and an accelerate config file) reach the run through
    ACCELERATE_MIXED_PRECISION; a run that names mixed_precision keeps its own."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = compose_config(["model=tiny_qwen3", f"output_dir={tmp_path}", *keys])
    accelerator, resolved = make_accelerator(config)
    assert str(accelerator.mixed_precision) == expected
    assert resolved.optim.mixed_precision == expected, "config.yaml records the precision the run used"
    assert resolved.optim.per_device_batch_size == 4


def _commands(path: Path) -> list[str]:
    """The ``accelerate launch`` / ``torchrun`` command lines of a document that start ``ldmole.cli.train``:
    an inline `...` span, or a code or comment line with its backslash continuations."""
    text = path.read_text()
    if path.suffix == ".yaml":
        text = "\n".join(re.sub(r"^#\s?", "", line) for line in text.splitlines() if line.startswith("#"))
    commands = []
    for match in re.finditer(r"accelerate launch|torchrun", text):
        start = match.start()
        if start > 0 and text[start - 1] == "`":
            command = text[start:text.index("`", start)]
        else:
            lines, rest = [], text[start:].splitlines()
            for line in rest:
                lines.append(line.rstrip("\\").strip())
                if not line.rstrip().endswith("\\"):
                    break
            command = " ".join(lines)
        command = " ".join(command.split())
        if "ldmole.cli.train" in command and "..." not in command:
            commands.append(command)
    return commands


def _launch(command: str) -> tuple[int, str, list[str]]:
    """(processes, launcher precision, key=value arguments) of a documented launch command."""
    words = shlex.split(command)
    options, keys = {}, [word for word in words if "=" in word and not word.startswith("-")]
    for index, word in enumerate(words[:-1]):
        if word.startswith("--"):
            options[word[2:]] = words[index + 1]
    processes, precision = 1, "no"
    if "config_file" in options:
        settings = yaml.safe_load((ROOT / options["config_file"]).read_text())
        processes, precision = settings.get("num_processes", 1), settings.get("mixed_precision", "no")
    processes = int(options.get("num_processes", options.get("nproc_per_node", processes)))
    return processes, options.get("mixed_precision", precision), keys


def test_every_documented_launch_command_has_a_batch_that_splits():
    commands = [(path, command) for path in DOCUMENTS for command in _commands(path)]
    assert len(commands) >= 3, f"the launch commands were not found: {commands}"
    for path, command in commands:
        processes, precision, keys = _launch(command)
        config = compose_config(keys)
        resolved = resolve_launch(config, processes, precision)  # raises when the batch does not split
        optim = resolved.optim
        micro_batches = gradient_accumulation(optim, processes)
        assert optim.per_device_batch_size * processes * micro_batches == optim.batch_size, (path, command)
        if config.optim.mixed_precision is None:
            assert optim.mixed_precision == precision, f"{path.name}: {command} ignores the launcher's precision"


@pytest.mark.parametrize("gpus, batch", [(gpus, batch) for gpus in range(9) for batch in ("", "6", "32")])
def test_run_sh_launches_a_batch_that_splits(gpus, batch):
    env = {**os.environ, "LDMOLE_PRINT_ARGS": "launch", "NUM_GPUS": str(gpus), "BATCH_SIZE": batch}
    result = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    words = [word for word in result.stdout.split("\0") if word]
    processes = int(words[words.index("--num_processes") + 1]) if "--num_processes" in words else 1
    assert processes <= max(gpus, 1)
    config = compose_config([word for word in words if "=" in word and not word.startswith("-")])
    optim = config.optim
    assert optim.per_device_batch_size is not None and optim.mixed_precision is not None, \
        "run.sh passes both, so ldmole-sweep can compare a finished run's config.yaml with them"
    assert optim.per_device_batch_size * processes * gradient_accumulation(optim, processes) == optim.batch_size
