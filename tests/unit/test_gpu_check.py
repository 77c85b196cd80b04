"""scripts/gpu_check.sh without a GPU (it must stop at once, non-zero, saying why, having run nothing) and the
report its Python half writes from the parts' outputs (scripts/gpu_check.py report), on made-up part results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time

import pytest
import torch

from tests.helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.sh"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the script runs the whole check")


def run_script(out, env_path: str):
    started = time.perf_counter()
    done = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PATH": env_path})
    return done, time.perf_counter() - started


@no_cuda
def test_without_a_gpu_it_stops_at_once_and_says_so(tmp_path):
    done, seconds = run_script(tmp_path / "out", os.environ["PATH"])
    assert done.returncode != 0 and seconds < 60
    assert "no CUDA GPU here" in done.stderr and "nothing was run" in done.stderr
    assert not (tmp_path / "out").exists()  # no part started, no report written


@no_cuda
def test_an_nvidia_smi_without_cuda_in_torch_still_stops(tmp_path):
    """A driver tool on PATH is not enough: torch must see the GPU too."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake'\n")
    (fake / "nvidia-smi").chmod(0o755)
    done, seconds = run_script(tmp_path / "out", f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert done.returncode != 0 and seconds < 90
    assert "no CUDA GPU here" in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_script_runs_every_part_with_its_own_time_limit():
    text = SCRIPT.read_text()
    for part in ("cuda_tests", "bench_layer", "bench_step_eager", "fsdp", "bench_step_compiled"):
        assert f"\npart {part} " in text, part
    assert "pytest -q -m cuda tests" in text and "--dtype bfloat16" in text
    assert "--model qwen3_1.7b_widths --layers 28" in text and "--batch 16 --seq-len 256" in text
    assert "timeout --kill-after" in text and "GPU_CHECK_BUDGET_S:-470" in text


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_result(ms: dict) -> dict:
    rows = [dict(method=m, label=m, path="trainer", median_ms=v, ratio_vs_lora_r64=v / ms["lora_r64"], peak_mb=100.0,
                 error=None) for m, v in ms.items()]
    return dict(setting=dict(model="qwen3_1.7b_widths", layers=28, batch=16, seq_len=256, dtype="bfloat16"),
                environment=dict(cuda_memory_allocated_mb=5000.0), memory=dict(shared_frozen_mb=3300.0), rows=rows)


def test_report_records_commit_gpu_parts_and_tables(gpu_check, tmp_path):
    out = tmp_path
    (out / "parts.tsv").write_text("cuda_tests\t0\t61\t150\nbench_layer\t0\t20\t90\nbench_step_eager\t124\t180\t180\n"
                                   "fsdp\t1\t40\t100\nbench_step_compiled\tskipped\t0\t12\n")
    (out / "cuda_tests.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.unit.test_cuda" name="test_a"/>'
        '<testcase classname="tests.unit.test_cuda" name="test_b"><failure message="x"/></testcase>'
        '</testsuite></testsuites>')
    (out / "bench_step_eager.json").write_text(json.dumps(step_result({"lora_r64": 200.0, "ldmole": 260.0})))
    (out / "fsdp").mkdir()
    (out / "fsdp" / "result.json").write_text(json.dumps(dict(
        ok=False, steps=4, checks={"fsdp_version_2": True, "adapter_reproduces_logits": False},
        max_abs_logit_diff=0.5)))
    assert gpu_check.report(out) == 1  # not every part passed
    report = json.loads((out / "gpu_check.json").read_text())
    assert {"commit", "dirty", "gpu", "parts", "cuda_tests", "bench_layer", "bench_step", "fsdp"} <= set(report)
    assert report["commit"]  # this checkout's git rev-parse
    status = {p["part"]: p["status"] for p in report["parts"]}
    assert status == {"cuda_tests": "passed", "bench_layer": "passed", "bench_step_eager": "timed out",
                      "fsdp": "failed (exit 1)", "bench_step_compiled": "skipped"}
    assert report["cuda_tests"]["passed"] == 3
    assert report["cuda_tests"]["failed_tests"] == ["tests.unit.test_cuda::test_b"]
    text = (out / "gpu_check.md").read_text()
    assert f"commit {report['commit']}" in text and "| bench_step_eager | timed out | 180 (180) |" in text
    assert "| ldmole | trainer | 260.0 | 1.30 | 100 |" in text
    assert "FSDP2 on one GPU" in text and "adapter_reproduces_logits NO" in text


def test_report_passes_only_when_every_part_passed(gpu_check, tmp_path):
    (tmp_path / "parts.tsv").write_text("cuda_tests\t0\t61\t150\n")
    assert gpu_check.report(tmp_path) == 0
    (tmp_path / "parts.tsv").write_text("")
    assert gpu_check.report(tmp_path) == 1  # nothing ran is not a pass
