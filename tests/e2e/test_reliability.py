"""Reliability: resume after SIGKILL, non-finite losses, multi-process CPU training, precision, bad input."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmole.experiment.checkpointing import latest_checkpoint
from ldmole.experiment.run_config import compose_config
from ldmole.experiment.trainer import NonFiniteLossError, train
from tests.helpers import DATA_DIR, REPO_ROOT, rescore, run_command, scaled, tiny_run

pytestmark = [pytest.mark.slow]

TINY = ("train_max_examples=200", "eval_max_examples=32",)  # settings every tiny run of this file shares


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("wall_time_s", "resumed_from")}


def test_resume_after_sigkill_ends_with_the_uninterrupted_metrics(tmp_path):
    # The fixture's 7 training rows make 7 steps per epoch only at batch 1.
    args = tiny_run(*TINY, "method=remole", "num_epochs=2", "max_steps=20", "save_every=3",
                   *scaled([], ["batch_size=1", "per_device_batch_size=1"]))
    reference = run_command("ldmole.cli.train", args + [f"output_dir={tmp_path / 'whole'}"])
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "ldmole.cli.train", *args, f"output_dir={out}"], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        latest = latest_checkpoint(out)
        if latest is not None and int(latest.name.split("-")[1]) >= 6:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run must be killed mid-training for this test"
    assert not (out / "metrics.json").exists()

    resumed = run_command("ldmole.cli.train", args + [f"output_dir={out}", "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    after = json.loads((out / "metrics.json").read_text())
    assert after["resumed_from"] is not None
    assert comparable(after) == comparable(whole), "a resumed run must end with exactly the uninterrupted metrics"
    steps = [e["step"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "lr" in e]
    assert steps == sorted(set(steps)), "log lines written after the checkpoint must not be duplicated"


def test_partial_checkpoint_directory_is_ignored(tmp_path):
    # Checkpoints at steps 2 and 4; the last step (5) ends the run and writes none.
    args = tiny_run(*TINY, "method=ldmole", "max_steps=5", "save_every=2", output_dir=tmp_path)
    train(compose_config(args))
    root = tmp_path / "checkpoints"
    assert (root / "step-00000004" / "complete.json").is_file()
    # A torn write, newer than the good checkpoint: a step directory holding files but no complete.json.
    torn = root / "step-00000009"
    torn.mkdir()
    for name in (p.name for p in (root / "step-00000004").iterdir() if p.name != "complete.json"):
        (torn / name).write_bytes(b"truncated")
    assert any(torn.iterdir()) and not (torn / "complete.json").exists()
    broken = root / ".tmp-step-00000010-crash"  # an interrupted assembly
    broken.mkdir()
    (broken / "trainer_state.pt").write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path) == root / "step-00000004", "a step directory without complete.json is a torn write"


def test_nonfinite_loss_names_component_step_and_last_good_checkpoint(tmp_path):
    config = compose_config(tiny_run(*TINY, "method=ldmole", "lr=1e30", "max_steps=6", "save_every=1",
                                    "debug_nonfinite=true", f"output_dir={tmp_path}"))
    with pytest.raises(NonFiniteLossError) as error:
        train(config)
    message = str(error.value)
    assert "non-finite loss at step 2" in message and "'task'" in message
    assert "step-00000001" in message and "resume=auto" in message
    assert re.search(r"first module with a non-finite output: (model|ldmole_lambda_mlps)\.\S+", message)
    assert latest_checkpoint(tmp_path).name == "step-00000001", "the last good checkpoint must survive"


def test_nonfinite_without_debug_is_reported_at_the_next_check(tmp_path):
    config = compose_config(tiny_run(*TINY, "method=softmax", "lr=1e30", "max_steps=6", "log_every=3", f"output_dir={tmp_path}"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2: component\(s\) \['lb', 'task'\]"):
        train(config)


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # accelerate 1.x's `launch --cpu` starts a single process; torchrun starts two and the trainer
    # joins them over gloo (Accelerator(cpu=True) when CUDA is absent).
    # Every micro-batch full on both processes (an uneven split would duplicate rows): 200 rows in batches of 8,
    # or 4 of the fixture's 7 rows in one batch of 4.
    batches = scaled(["batch_size=8", "per_device_batch_size=4"],
                     ["train_max_examples=4", "batch_size=4", "per_device_batch_size=2"])
    args = tiny_run(*TINY, "method=ldmole", "max_steps=8", "mole.dropout=0.0", *batches, "eval_batch_size=16", "log_every=4")
    single = run_command("ldmole.cli.train", args + [f"output_dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_command("torch.distributed.run", ["--nproc_per_node", "2", "-m", "ldmole.cli.train", *args,
                                                    f"output_dir={tmp_path / 'two'}"])
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["num_processes"] == 2 and two["num_eval_examples"] == one["num_eval_examples"] == scaled(32, 8)
    assert two["accuracy"] == one["accuracy"]
    assert two["routing"]["avg_active_experts"] == pytest.approx(one["routing"]["avg_active_experts"], abs=1e-3)
    log_one = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines() if '"lr"' in x]
    log_two = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines() if '"lr"' in x]
    for a, b in zip(log_one, log_two, strict=True):
        assert b["task"] == pytest.approx(a["task"], rel=1e-4), "same global batch must give the same loss"


def test_short_last_step_of_an_epoch_matches_training_without_accumulation(tmp_path):
    # 10 examples at batch 4 (6 on the fixture): the last step of an epoch has 2 examples, i.e. one of two
    # micro-batches when per_device_batch_size=2. Its gradient and its logged loss must still be the mean
    # over its examples. The load-balance loss is off: it is computed per micro-batch and is not additive.
    examples = scaled(10, 6)
    base = tiny_run(*TINY, "method=ldmole", f"train_max_examples={examples}", "batch_size=4", "num_epochs=2", "log_every=1",
                   "mole.dropout=0.0", "lb_coef=0", "eval_max_examples=8")
    logs, weights = [], []
    for per_device in (4, 2):
        out = tmp_path / f"per_device{per_device}"
        metrics = train(compose_config(base + [f"per_device_batch_size={per_device}", f"output_dir={out}"]))
        assert metrics.steps == 2 * math.ceil(examples / 4)
        logs.append([json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"lr"' in x])
        weights.append(load_file(str(out / "adapter" / "adapter.safetensors")))
    for a, b in zip(*logs, strict=True):
        assert b["task"] == pytest.approx(a["task"], rel=1e-4), f"step {a['step']}: logged task loss differs"
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        # Round-off only. An AdamW step moves an element by about lr = 1e-4; the summation order of the
        # accumulated gradient changes the float32 round-off, which Adam's normalisation amplifies on
        # elements with a near-zero gradient: measured at most 7.1e-7 (lora_B) and 4.2e-7 (router) after
        # 6 steps, so rtol 1e-5 / atol 1e-7 cannot hold. 2e-6 is 1/50 of one step's move.
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-5, atol=2e-6,
                                   msg=lambda m, name=name: f"{name} differs with accumulation: {m}")


def test_bf16_autocast_on_cpu_trains_with_finite_losses(tmp_path):
    metrics = train(compose_config(tiny_run(*TINY, "method=ldmole", "max_steps=4", "log_every=2", "mixed_precision=bf16",
                                           f"output_dir={tmp_path}")))
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines() if '"lr"' in x]
    assert len(log) == 2 and all(abs(e["task"]) < 1e3 and abs(e["lb"]) < 1e3 for e in log)
    # The adapter scored here under the same bf16 autocast: the run's accuracy and routing.
    accuracy, routing = rescore(tmp_path / "adapter", compose_config(tiny_run(*TINY, "method=ldmole")),
                                autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert metrics.accuracy == pytest.approx(accuracy, abs=1e-12)
    assert metrics.routing["avg_active_experts"] == pytest.approx(routing["avg_active_experts"], rel=1e-5)


def test_gradient_checkpointing_gives_same_losses_and_routing(tmp_path):
    results = []
    for flag in ("false", "true"):
        out = tmp_path / flag
        metrics = train(compose_config(tiny_run(*TINY, "method=ldmole", "max_steps=4", "log_every=2", "sparsity_coef=0.1",
                                               f"gradient_checkpointing={flag}", f"output_dir={out}")))
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"lr"' in x]
        results.append((log, metrics.routing))
    (log_a, routing_a), (log_b, routing_b) = results
    for a, b in zip(log_a, log_b, strict=True):
        for key in ("task", "lb", "sparsity"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), f"{key} differs with gradient checkpointing"
    assert routing_b["avg_active_experts"] == pytest.approx(routing_a["avg_active_experts"], rel=1e-6)
    assert routing_b["lambda"]["mean"] == pytest.approx(routing_a["lambda"]["mean"], rel=1e-6)


def write_arc(directory: Path, rows: list, split: str = "train") -> None:
    (directory / "arc_challenge").mkdir(parents=True, exist_ok=True)
    (directory / "arc_challenge" / f"{split}.jsonl").write_text("".join(
        (row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def arc_row(n_options: int = 4, answer: str = "A") -> dict:
    labels = [chr(ord("A") + i) for i in range(n_options)]
    return {"id": "x", "question": "Which?", "choices": {"text": [f"option {l}" for l in labels], "label": labels},
            "answerKey": answer}


def bad_data(kind: str, root: Path) -> Path:
    good = [arc_row() for _ in range(30)]
    if kind == "missing_dir":
        return root / "nowhere"
    if kind == "malformed_jsonl":
        write_arc(root, good[:3] + ['{"id": "y", "question": "Broken"'] + good[3:])
    elif kind == "missing_field":
        write_arc(root, good[:2] + [{"id": "z", "choices": arc_row()["choices"], "answerKey": "A"}])
    elif kind == "empty_split":
        write_arc(root, [])
    elif kind == "eleven_options":
        write_arc(root, good[:5] + [arc_row(11)])
    elif kind == "answer_not_an_option":
        write_arc(root, good[:5] + [arc_row(4, answer="Q")])
    for split in ("validation",):
        if kind not in ("missing_dir",) and not (root / "arc_challenge" / f"{split}.jsonl").exists():
            write_arc(root, good, split)
    return root


BAD_INPUT = [
    # (overrides, data problem, what the error must say)
    (["model=qwen4"], None, ["unknown model 'qwen4'", "choose one of"]),
    (["task=arcc"], None, ["unknown task 'arcc'", "did you mean 'arc_c'"]),
    (["method=lda"], None, ["unknown method 'lda'", "choose one of"]),
    (["learning_rate=1"], None, ["unknown key 'learning_rate'", "valid keys"]),
    (["method=mola_8888", "mole.top_k=9"], None, ["top_k=9 exceeds", "lower top_k or add experts"]),
    ([], "missing_dir", ["arc_challenge", "nowhere", "data_dir"]),
    ([], "malformed_jsonl", ["train.jsonl", "line 4"]),
    ([], "missing_field", ["line 3", "question"]),
    ([], "empty_split", ["train", "empty"]),
    ([], "eleven_options", ["line 6", "11 options", "10"]),
    ([], "answer_not_an_option", ["line 6", "answerKey"]),
    (["max_length=40"], "ok", ["max_length=40", "truncate_long=true"]),
]


@pytest.mark.parametrize("overrides, data, expected", BAD_INPUT, ids=[
    "unknown_model", "unknown_task", "unknown_method", "unknown_key", "top_k_above_experts", "missing_data_dir",
    "malformed_jsonl", "missing_field", "empty_split", "eleven_options", "answer_not_an_option", "too_long"])
def test_bad_input_errors_name_problem_and_fix(overrides, data, expected, tmp_path):
    data_dir = bad_data(data, tmp_path / "data") if data and data != "ok" else DATA_DIR
    args = tiny_run(f"output_dir={tmp_path / 'out'}", "max_steps=1", *overrides, data_dir=data_dir)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        train(compose_config(args))
    for fragment in expected:
        assert fragment in str(error.value), f"{fragment!r} missing from: {error.value}"
    assert not (tmp_path / "out" / "metrics.json").exists()
