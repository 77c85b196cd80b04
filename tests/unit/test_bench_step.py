"""ldmole-bench-step (the command, ``ldmole.cli.bench_step``, and its measuring library,
``ldmole.experiment.step_bench``) on a one-layer tiny random Qwen3: every method row in the JSON, ratios taken
against the LoRA r=64 (ours) row of the same path, clear errors for bad options, and both code paths really
stepping the optimiser. No timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import DATA_DIR, tokenizer_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A 1-layer tiny Qwen3 with the fixture's 1024-token tokenizer: every variant builds in well under a second.
TINY = ["--model", "tiny_qwen3", "--layers", "1", "--tokenizer", str(DATA_DIR / "tokenizers" / "qwen3"),
        "--data-dir", str(DATA_DIR), "--batch", "4", "--warmup", "1", "--steps", "2", "--threads", "1",
        "--device", "cpu"]
ROW_KEYS = {"method", "label", "path", "median_ms", "min_ms", "times_ms", "tokens_per_s", "ratio_vs_lora_r64",
            "trainer_over_library", "peak_mb", "state_mb", "trainable_params", "params_changed", "lora_b_moved",
            "compile",
            "timed_compiles", "notes", "error"}


@pytest.fixture(scope="module")
def cli():
    from ldmole.cli import bench_step as module

    return module


@pytest.fixture(scope="module")
def step_bench():
    from ldmole.experiment import step_bench as module

    return module


@pytest.fixture(scope="module")
def result(cli, tmp_path_factory):
    """One run of every default method on both paths (CoLA batch of 4), with its JSON and printed table."""
    out = tmp_path_factory.mktemp("bench_step") / "step.json"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli.main(TINY + ["--json", str(out)])
    return status, json.loads(out.read_text()), printed.getvalue()


def test_every_method_and_path_has_a_complete_row(result, step_bench):
    status, data, printed = result
    assert status == 0, printed[-3000:]
    assert {"environment", "setting", "reference", "memory", "rows"} <= set(data)
    assert data["reference"] == "lora_r64" and data["setting"]["task"] == "cola"
    assert data["setting"]["layers"] == 1 and data["setting"]["batch"] == 4
    expected = {(m, p) for m in step_bench.DEFAULT_METHODS for p in step_bench.PATHS
                if not step_bench.METHODS[m].peft or p == "library"}
    rows = {(r["method"], r["path"]): r for r in data["rows"]}
    assert set(rows) == expected and len(data["rows"]) == len(expected) == 15
    for key, row in rows.items():
        assert set(row) == ROW_KEYS, key
        assert row["error"] is None, (key, row["error"])
        assert len(row["times_ms"]) == 2 and all(t > 0 for t in row["times_ms"]), key
        assert row["median_ms"] > 0 and row["tokens_per_s"] > 0 and row["trainable_params"] > 0, key
        assert row["peak_mb"] > 0 and row["state_mb"] > 0, key
        assert f"| {row['label']} | {row['path']} |" in printed
    # The environment says which code it measured.
    assert "commit" in data["environment"] and "dirty" in data["environment"]


def test_ratios_are_against_the_lora_r64_row_of_the_same_path(result):
    _, data, _ = result
    rows = {(r["method"], r["path"]): r for r in data["rows"]}
    for (method, path), row in rows.items():
        ref = rows[("lora_r64", path)]
        assert row["ratio_vs_lora_r64"] == pytest.approx(row["median_ms"] / ref["median_ms"])
        if path == "trainer":
            library = rows[(method, "library")]
            assert row["trainer_over_library"] == pytest.approx(row["median_ms"] / library["median_ms"])
        else:
            assert row["trainer_over_library"] is None
    assert rows[("lora_r64", "trainer")]["ratio_vs_lora_r64"] == 1.0


def test_every_variant_stepped_its_optimizer(result):
    """Every lora_B starts at zero, so only a gradient step moves it (AdamW's weight decay keeps zero at zero)."""
    _, data, _ = result
    assert all(row["lora_b_moved"] == 1.0 for row in data["rows"])
    assert all(row["params_changed"] > 0.9 for row in data["rows"])  # a zero-initialised bias may get no gradient


def test_ours_and_peft_train_the_same_parameter_count(result):
    _, data, _ = result
    rows = {(r["method"], r["path"]): r for r in data["rows"]}
    assert rows[("peft_lora_r64", "library")]["trainable_params"] == rows[("lora_r64", "library")]["trainable_params"]
    assert rows[("lora_r64", "trainer")]["trainable_params"] == rows[("lora_r64", "library")]["trainable_params"]
    assert rows[("lora_r64", "library")]["trainable_params"] > rows[("lora_r8", "library")]["trainable_params"]


@pytest.mark.parametrize("args, fragment", [
    (["--methods", "lora_r64,nope"], "--methods: unknown method 'nope'"),
    (["--methods", "ldmole"], "--methods must include lora_r64"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--seq-len", "64"], "--seq-len applies to --data random"),
    (["--compile", "--warmup", "0"], "--compile needs --warmup >= 1"),
    (["--paths", "trainer,gpu"], "--paths trainer,gpu"),
    (["--paths", "trainer"], "peft_lora_r64 runs on the library path only"),
    (["--methods", "base,lora_r64"], "--decode only"),
    (["--prompt-len", "8"], "--prompt-len applies to --decode --data random"),
    (["--profile", "nope"], "--profile 'nope' is not a measured variant"),
    (["--profile", "ldmole/gpu"], "--profile 'ldmole/gpu' is not a measured variant"),
    (["--saved", "nope"], "--saved 'nope' is not a measured variant"),
    (["--decode", "--saved", "ldmole"], "decoding has no backward"),
])
def test_bad_options_name_the_option_and_the_fix(cli, capsys, args, fragment):
    assert cli.main(TINY + args) == 2
    assert fragment in capsys.readouterr().err


def test_bad_model_layers_and_data_dir_are_refused_before_anything_loads(cli, capsys, tmp_path):
    assert cli.main(["--model", "nope_model"]) == 2
    assert "--model 'nope_model' is unknown" in capsys.readouterr().err
    assert cli.main(["--model", "smollm2_135m", "--layers", "2", "--data-dir", str(DATA_DIR)]) == 2
    assert "--layers applies to random models" in capsys.readouterr().err
    assert cli.main(["--data-dir", str(tmp_path)]) == 2
    assert "no glue_cola/ folder there" in capsys.readouterr().err
    assert cli.main(TINY + ["not_a_key=1"]) == 2
    assert "not_a_key" in capsys.readouterr().err


def _context(step_bench, methods):
    settings = step_bench.resolved(step_bench.StepBenchSettings(
        model="tiny_qwen3", layers=1, tokenizer=str(tokenizer_dir("qwen3")), data_dir=str(DATA_DIR), batch=4,
        device="cpu", methods=methods))
    return step_bench.BenchContext(settings, log=lambda _: None)


@pytest.mark.parametrize("path", ["trainer", "library"])
def test_both_paths_step_the_optimizer_with_gradients(step_bench, path):
    """One step moves every lora_B off zero (only a gradient step can: weight decay keeps zero at zero) and
    every non-zero trainable tensor (AdamW's decoupled weight decay reaches each parameter it steps), on both
    paths. A zero-initialised bias may legitimately get no gradient (the λ-MLP of a layer whose routing is dense:
    the load-balance loss is then constant)."""
    ctx = _context(step_bench, ["lora_r64", "ldmole"])
    try:
        build = step_bench.build_trainer_variant if path == "trainer" else step_bench.build_library_variant
        variant = build(step_bench.METHODS["ldmole"], ctx)
        names = {id(p): n for n, p in variant.model.named_parameters()}
        before = [p.detach().clone() for p in variant.params]
        lora_b = [i for i, p in enumerate(variant.params) if "lora_B" in names[id(p)]]
        assert lora_b and not any(before[i].any() for i in lora_b)  # every expert B starts at zero
        variant.step()
        changed = [not torch.equal(b, p.detach()) for b, p in zip(before, variant.params)]
        assert all(changed[i] for i in lora_b)
        stuck = [names[id(p)] for p, b, c in zip(variant.params, before, changed) if b.any() and not c]
        assert not stuck
        assert all(p.grad is None for p in variant.params)  # zero_grad(set_to_none=True) ran after the step
    finally:
        ctx.close()


def test_frozen_weights_are_shared_between_variants(step_bench):
    ctx = _context(step_bench, ["lora_r64", "peft_lora_r64"])
    try:
        ours = step_bench.build_library_variant(step_bench.METHODS["lora_r64"], ctx)
        peft = step_bench.build_library_variant(step_bench.METHODS["peft_lora_r64"], ctx)
        frozen = {n: p for n, p in ours.model.named_parameters() if not p.requires_grad}
        q_ours = frozen["model.layers.0.self_attn.q_proj.base_layer.weight"]
        peft_names = dict(peft.model.named_parameters())
        q_peft = peft_names["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
        assert q_ours is q_peft and ctx.frozen.shared_bytes > 0
    finally:
        ctx.close()


def test_decode_rows_and_ratio(cli, tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert cli.main(TINY + ["--decode", "--new-tokens", "3", "--profile", "ldmole", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data["profiles"]) == ["ldmole"] and "Self CPU" in data["profiles"]["ldmole"]
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"base", "lora_r64", "ldmole"}
    for row in rows.values():
        assert row["error"] is None and row["ms_per_token"] > 0 and len(row["times_ms_per_token"]) == 2
        assert row["ratio_vs_lora_r64"] == pytest.approx(row["ms_per_token"] / rows["lora_r64"]["ms_per_token"])
        assert len(row["generated"]) == 4  # the prefill's token, then one per decoding step
    # LoRA's B starts at zero: it generates the base model's tokens.
    assert rows["lora_r64"]["generated"] == rows["base"]["generated"]
    printed = capsys.readouterr().out
    assert "| base (no adapter) |" in printed and "### torch.profiler, ldmole: " in printed


def test_profile_and_saved_print_their_tables_for_the_named_variants_only(cli, tmp_path, capsys):
    out = tmp_path / "step.json"
    assert cli.main(TINY + ["--methods", "lora_r64,ldmole", "--profile", "ldmole/library", "--saved", "ldmole",
                            "--profile-rows", "5", "--steps", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    profiles, saved = data["profiles"], data["saved_tensors"]
    assert list(profiles) == ["ldmole/library"] and "Self CPU" in profiles["ldmole/library"]
    assert sorted(saved) == ["ldmole/library", "ldmole/trainer"]
    for entries in saved.values():
        assert entries == sorted(entries, key=lambda e: -e["mb"]) and all(e["mb"] > 0 for e in entries)
        modules = {e["module"] for e in entries}
        # the λ-MLP's hidden units (lambda_hidden wide) are saved inside the adapted projections that compute λ
        assert {"MoLELinear <q_proj>", "MoLELinear <down_proj>"} <= modules
        width = {tuple(e["shape"]) for e in entries if e["module"] == "MoLELinear <q_proj>"}
        assert any(shape[-1:] == (256,) for shape in width), width
    printed = capsys.readouterr().out
    assert "### torch.profiler, ldmole/library: " in printed and "### saved for the backward, ldmole/trainer" in printed


def test_the_trainer_path_builds_its_model_with_the_trainers_own_function(step_bench):
    """The bench's trainer path calls ``trainer.training_model`` (what ``train()`` calls), not a copy of it."""
    import inspect

    from ldmole.experiment import trainer

    assert "training_model(config, run)" in inspect.getsource(trainer.train)
    assert "training_model(config, run)" in inspect.getsource(step_bench.build_trainer_variant)
    assert not hasattr(step_bench, "training_model"), "no second copy of the trainer's model preparation"
