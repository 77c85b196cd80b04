#!/usr/bin/env python
"""The Python half of scripts/gpu_check.sh: the one-GPU FSDP2 check and the report.

    python scripts/gpu_check.py fsdp OUT_DIR       # writes an accelerate FSDP2 config, launches the worker, checks
    python scripts/gpu_check.py fsdp-worker OUT_DIR  # (under accelerate launch) trains, saves, compares logits
    python scripts/gpu_check.py report OUT_DIR     # gpu_check.json + gpu_check.md from the parts' outputs

FSDP2 check: ``ldmole.experiment.trainer.train`` runs a tiny random Qwen3 with LD-MoLE (ARC-Easy, 4 optimiser
steps of 2 micro-batches) under ``accelerate launch`` with a one-process FSDP2 config written here (full
shard, Qwen3DecoderLayer units, no mixed precision so that the comparison can be tight). Right after the
trainer's ``finish`` (which loads the best epoch's weights into the sharded model and saves ``adapter/``), the
sharded model's logits on the first evaluation batch are taken; the saved adapter, loaded with ``load_mole``
into a freshly built base on the same GPU, must give the same logits (max |diff| <= 1e-4). Also checked: the
run was FSDP version 2, the MoLE parameters were DTensors (sharded), every logged loss is finite.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FSDP_STEPS = 4
LOGIT_TOLERANCE = 1e-4

ACCELERATE_FSDP2_ONE_GPU = """\
# Written by scripts/gpu_check.py: FSDP2 on one GPU (full shard of one process), no mixed precision.
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: 'no'
num_machines: 1
num_processes: 1
machine_rank: 0
rdzv_backend: static
same_network: true
use_cpu: false
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: Qwen3DecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
  fsdp_activation_checkpointing: false
"""


def data_dir() -> Path:
    env = os.environ.get("LDMOLE_DATA_DIR")
    return Path(env) if env and Path(env).is_dir() else REPO_ROOT / "tests" / "fixtures" / "data"


def fsdp(out: Path) -> int:
    """Writes the accelerate config and launches the worker; the worker's checks decide the exit status."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "accelerate_fsdp2_1gpu.yaml"
    config.write_text(ACCELERATE_FSDP2_ONE_GPU)
    with socket.socket() as sock:  # a free port for the (one-process) rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(port), str(Path(__file__).resolve()), "fsdp-worker", str(out)]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=REPO_ROOT).returncode


def fsdp_worker(out: Path) -> int:
    import torch
    from torch.distributed.tensor import DTensor

    from ldmole.core.adapter_io import load_mole
    from ldmole.core.injection import mole_parameters
    from ldmole.experiment.run import Run
    from ldmole.experiment.run_config import compose_config
    from ldmole.experiment.selected_logits import SelectedLogits
    from ldmole.experiment.trainer import Trainer, train

    data = data_dir()
    config = compose_config([
        "model=tiny_qwen3", "task=arc_e", "method=ldmole", f"data_dir={data}",
        f"tokenizer={data / 'tokenizers' / 'qwen3'}", f"output_dir={out / 'run'}", "overwrite=true",
        f"max_steps={FSDP_STEPS}", "batch_size=4", "per_device_batch_size=2", "train_max_examples=32",
        "eval_max_examples=8", "eval_batch_size=8", "log_every=1", "save_every=2"])
    seen: dict = {}
    finish = Trainer.finish

    def finish_and_capture(self, *args, **kwargs):
        """The trainer's finish, then the sharded model's logits on the first evaluation batch."""
        metrics = finish(self, *args, **kwargs)
        batch = next(iter(self.eval_loader))
        model = self.eval_model().eval()  # no dropout, as evaluation
        with torch.no_grad(), self.accelerator.autocast():
            logits = model(batch["input_ids"], batch["attention_mask"], batch["positions"])
        seen.update(logits=logits.float().cpu(), device=str(self.accelerator.device),
                    batch={k: v.cpu() for k, v in batch.items() if torch.is_tensor(v)},
                    sharded=bool(self.sharded), distributed_type=str(self.accelerator.distributed_type),
                    fsdp2=bool(getattr(self.accelerator, "is_fsdp2", False)),
                    dtensor=all(isinstance(p, DTensor) for p in mole_parameters(self.base).values()))
        return metrics

    Trainer.finish = finish_and_capture
    metrics = train(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    device = torch.device(seen["device"])  # the trainer's device: the same kernels for both logits
    fresh = load_mole(Run(config).base_model(), out / "run" / "adapter").to(device).eval()
    batch = {k: v.to(device) for k, v in seen["batch"].items()}
    with torch.no_grad():
        again = SelectedLogits(fresh)(batch["input_ids"], batch["attention_mask"], batch["positions"]).float().cpu()
    diff = float((again - seen["logits"]).abs().max())
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    losses = [entry["task"] for entry in log if "task" in entry]
    checks = {
        "fsdp_version_2": seen["fsdp2"] and "FSDP" in seen["distributed_type"],
        "mole_parameters_sharded": seen["sharded"] and seen["dtensor"],
        "trained_all_steps": metrics.steps == FSDP_STEPS,
        "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses),
        "adapter_saved": (out / "run" / "adapter").is_dir(),
        "adapter_reproduces_logits": diff <= LOGIT_TOLERANCE,
    }
    result = dict(ok=all(checks.values()), checks=checks, max_abs_logit_diff=diff, tolerance=LOGIT_TOLERANCE,
                  steps=metrics.steps, task_losses=losses, accuracy=metrics.accuracy,
                  distributed_type=seen["distributed_type"], logits_shape=list(seen["logits"].shape))
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _junit(path: Path) -> dict | None:
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def _gpu() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return {"gpu": torch.cuda.get_device_name(0), "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "torch": torch.__version__, "cuda": torch.version.cuda}
        return {"gpu": None, "torch": torch.__version__}
    except Exception as error:  # the report is written whatever happened before
        return {"gpu": None, "error": repr(error)}


def _git(*args: str) -> str | None:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def report(out: Path) -> int:
    """gpu_check.json and gpu_check.md from parts.tsv and each part's own output."""
    parts = []
    for line in (out / "parts.tsv").read_text().splitlines() if (out / "parts.tsv").is_file() else []:
        name, rc, seconds, limit = line.split("\t")
        status = "passed" if rc == "0" else ("timed out" if rc in ("124", "137") else
                                             "skipped" if rc == "skipped" else f"failed (exit {rc})")
        parts.append(dict(part=name, status=status, exit=rc, seconds=int(seconds), limit_s=int(limit)))
    status = _git("status", "--porcelain", "--untracked-files=no")
    result = dict(commit=_git("rev-parse", "--short", "HEAD"), dirty=bool(status) if status is not None else None,
                  **_gpu(), parts=parts, cuda_tests=_junit(out / "cuda_tests.xml"),
                  bench_layer=_read_json(out / "bench_layer.json"),
                  bench_step={mode: _read_json(out / f"bench_step_{mode}.json") for mode in ("eager", "compiled")},
                  fsdp=_read_json(out / "fsdp" / "result.json"))
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if parts and all(p["status"] == "passed" for p in parts) else 1


def markdown(result: dict) -> str:
    lines = [f"# GPU check: {result.get('gpu')}", "",
             f"commit {result.get('commit')}"
             + (" (working tree had uncommitted changes)" if result.get("dirty") else "")
             + f"; torch {result.get('torch')}, CUDA {result.get('cuda')}", "",
             "| part | status | seconds (limit) |", "|---|---|---:|"]
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']} ({p['limit_s']}) |" for p in result["parts"]]
    tests = result.get("cuda_tests")
    if tests:
        lines += ["", f"CUDA tests (`pytest -m cuda`): {tests['passed']} passed, {tests['failures']} failed, "
                      f"{tests['errors']} errors, {tests['skipped']} skipped"
                  + (f"; failing: {', '.join(tests['failed_tests'])}" if tests["failed_tests"] else "")]
    layer = result.get("bench_layer")
    if layer:
        lines += ["", "Layer bench (bf16, Qwen3-1.7B shapes), goal ratios at 2048x6144:", ""]
        for router, goal in (layer.get("goals") or {}).items():
            lines.append(f"- {router}: speed-up vs dense-einsum {goal['speedup_vs_dense']:.2f}x (goal >= "
                         f"{goal['speedup_goal']:g}x), time / PEFT LoRA {goal['ratio_vs_peft']:.2f} (goal <= "
                         f"{goal['ratio_goal']:g})")
    steps = result.get("bench_step") or {}
    if any(steps.values()):
        any_run = next(r for r in steps.values() if r)
        s = any_run["setting"]
        lines += ["", f"Whole training steps, {s['model']} ({s['layers']} layers), batch [{s['batch']}, "
                      f"{s['seq_len']}], {s['dtype']}; ms/step, ÷ LoRA r=64 (ours) of the same path, peak MB "
                      "(CUDA allocator delta over one step):", "",
                  "| method | path | eager ms | ÷ lora r64 | peak MB | compiled ms | ÷ lora r64 | peak MB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        rows: dict = {}
        for mode, run in steps.items():
            for row in (run or {}).get("rows", []):
                rows.setdefault((row["label"], row["path"]), {})[mode] = row
        for (label, path), by_mode in rows.items():
            cells = []
            for mode in ("eager", "compiled"):
                row = by_mode.get(mode) or {}
                failed = "failed" if row.get("error") else ""
                cells += [_fmt(row.get("median_ms"), ".1f") or failed, _fmt(row.get("ratio_vs_lora_r64"), ".2f"),
                          _fmt(row.get("peak_mb"), ".0f")]
            lines.append(f"| {label} | {path} | " + " | ".join(cells) + " |")
        for mode, run in steps.items():
            if run and run["environment"].get("cuda_memory_allocated_mb") is not None:
                lines.append(f"\n{mode}: {run['environment']['cuda_memory_allocated_mb']:.0f} MB allocated with every "
                             f"variant built (frozen base held once: {run['memory']['shared_frozen_mb']:.0f} MB)")
    fsdp_result = result.get("fsdp")
    if fsdp_result:
        lines += ["", f"FSDP2 on one GPU (tiny Qwen3, LD-MoLE, {fsdp_result['steps']} steps): "
                      + ("ok" if fsdp_result["ok"] else "FAILED") + "; "
                      + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in fsdp_result["checks"].items())
                      + f"; max |logit diff| {fsdp_result['max_abs_logit_diff']:.2e}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    commands = {"fsdp": fsdp, "fsdp-worker": fsdp_worker, "report": report}
    if len(argv) != 2 or argv[0] not in commands:
        print(f"usage: python scripts/gpu_check.py {{{','.join(commands)}}} OUT_DIR", file=sys.stderr)
        return 2
    return commands[argv[0]](Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
