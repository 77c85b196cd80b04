"""ldmole-bench-step as a command (``python -m ldmole.cli.bench_step`` in a subprocess): a tiny random Llama on
random tokens, the compiled mode (whose failures must be reported, not hidden), and the real SmolLM2-135M on
CoLA with its decode benchmark. No timing is asserted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import DATA_DIR, run_command, tokenizer_dir

pytestmark = pytest.mark.slow
TINY = ["--data-dir", str(DATA_DIR), "--device", "cpu", "--threads", "1", "--warmup", "1", "--steps", "2"]


def bench(args: list[str], out: Path, timeout: int = 600) -> tuple[int, dict, str]:
    result = run_command("ldmole.cli.bench_step", args + ["--json", str(out)], timeout=timeout)
    data = json.loads(out.read_text()) if out.is_file() else {}
    return result.returncode, data, result.stdout + result.stderr


def test_tiny_llama_on_random_tokens_every_method(tmp_path):
    status, data, output = bench(TINY + ["--model", "tiny_llama", "--layers", "2", "--tokenizer",
                                         str(tokenizer_dir("llama3")), "--data", "random", "--seq-len", "24",
                                         "--batch", "3"], tmp_path / "step.json")
    assert status == 0, output[-4000:]
    assert data["setting"]["seq_len"] == 24 and data["setting"]["tokens"] == 3 * 24
    assert data["setting"]["model_info"]["class"] == "LlamaForSequenceClassification"
    assert len(data["rows"]) == 15 and all(r["error"] is None and r["lora_b_moved"] == 1.0 for r in data["rows"])
    assert "note: mola_8888: mole.num_experts='8888' needs >= 4 layers" in output
    assert "| ldmole | trainer |" in output and "peak MB: peak net bytes" in output


def test_compiled_run_reports_how_each_variant_was_compiled(tmp_path):
    """Compiled variants say who compiled them; a variant that fails to compile is a row with its error and a
    non-zero exit status, never a silent eager number."""
    status, data, output = bench(TINY + ["--model", "tiny_qwen3", "--layers", "1", "--tokenizer",
                                         str(tokenizer_dir("qwen3")), "--batch", "2", "--compile",
                                         "--methods", "lora_r64,ldmole", "--warmup", "3"], tmp_path / "c.json")
    assert data, output[-4000:]
    rows = data["rows"]
    assert data["setting"]["compile"] is True and len(rows) == 4
    assert all(r["compile"] for r in rows)
    failed = [r for r in rows if r["error"]]
    assert status == (1 if failed else 0), output[-4000:]
    assert all(r["lora_b_moved"] == 1.0 for r in rows if not r["error"])


smollm2 = pytest.mark.skipif(not (Path(os.environ.get("LDMOLE_CACHE", Path.home() / ".cache" / "ldmole")) /
                                  "smollm2_135m" / "config.json").is_file(),
                             reason="SmolLM2-135M not prepared (run ldmole-prepare-smollm2)")


@smollm2
def test_smollm2_on_cola_both_paths_and_decode(tmp_path):
    args = ["--data-dir", str(DATA_DIR), "--device", "cpu", "--warmup", "0", "--steps", "1"]
    status, data, output = bench(args + ["--batch", "4", "--methods", "lora_r64,ldmole"], tmp_path / "step.json")
    assert status == 0, output[-4000:]
    assert data["setting"]["model_info"]["layers"] == 30 and data["setting"]["data"] == "cola"
    assert {(r["method"], r["path"]) for r in data["rows"]} == {
        ("lora_r64", "trainer"), ("lora_r64", "library"), ("ldmole", "trainer"), ("ldmole", "library")}
    status, data, output = bench(args + ["--decode", "--new-tokens", "4"], tmp_path / "decode.json")
    assert status == 0, output[-4000:]
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"base", "lora_r64", "ldmole"} and rows["lora_r64"]["ratio_vs_lora_r64"] == 1.0
    assert rows["lora_r64"]["generated"] == rows["base"]["generated"]
