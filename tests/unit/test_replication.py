"""``replicate=reference``: one switch that applies the reference release's setting to each paper model, is
recorded, refuses contradicting keys and cannot be claimed by a config that does not hold it."""

from __future__ import annotations

import os
import subprocess

import pytest

from ldmole.experiment.replication import REPLICATIONS, replication_keys
from ldmole.experiment.run_config import RunConfig, compose_config
from ldmole.experiment.run_identity import flatten
from tests.helpers import REPO_ROOT

PAPER_MODELS = {"qwen3_0.6b": "reference_qwen3", "qwen3_1.7b": "reference_qwen3", "llama3.2_1b": "reference_llama3",
                "llama3.2_3b": "reference_llama3", "llama3.1_8b": "reference_llama3"}
# What the switch must set, written out here (not read from REPLICATIONS) so that a change to it fails a test.
REFERENCE_KEYS = {"protocol": "reference", "torch_dtype": "float32", "mixed_precision": "fp16",
                  "mole.router_input": "dropout"}


@pytest.mark.parametrize("model", sorted(PAPER_MODELS))
@pytest.mark.parametrize("method", ["ldmole", "ldmole_reference", "mola_8888"])
def test_replicate_reference_sets_every_key_for_each_paper_model(model, method):
    plain = flatten(compose_config([f"model={model}", f"method={method}"]).to_flat())
    replicated = flatten(compose_config([f"model={model}", f"method={method}", "replicate=reference"]).to_flat())
    assert replicated["replicate"] == "reference", "config.yaml records the switch"
    assert replicated["chat_format"] == PAPER_MODELS[model]
    for key, value in REFERENCE_KEYS.items():
        assert replicated[key] == value, key
    changed = {key for key in replicated if replicated[key] != plain.get(key)}
    assert changed <= {"replicate", "chat_format", *REFERENCE_KEYS}, f"the switch changed more: {changed}"
    assert replicated["mole.lambda_init"] == plain["mole.lambda_init"], "the λ-MLP initialisation stays the method's"
    assert set(REPLICATIONS["reference"].keys) == set(REFERENCE_KEYS)


def test_a_config_yaml_that_claims_the_switch_must_hold_it():
    flat = compose_config(["model=qwen3_1.7b", "replicate=reference"]).to_flat()
    assert RunConfig.from_flat(flat).replicate == "reference", "a composed config reads back"
    for key, value in [("protocol", "selection"), ("mixed_precision", "bf16"), ("chat_format", "qwen3")]:
        crafted = {**flat, key: value}
        with pytest.raises(ValueError, match=f"replicate=reference contradicts {key}="):
            RunConfig.from_flat(crafted)
    crafted = {**flat, "mole": {**flat["mole"], "router_input": "x"}}
    with pytest.raises(ValueError, match="contradicts mole.router_input='x' where it sets 'dropout'"):
        RunConfig.from_flat(crafted)


@pytest.mark.parametrize("override", ["mixed_precision=bf16", "protocol=selection", "mole.router_input=x",
                                      "torch_dtype=bfloat16", "chat_format=qwen3"])
def test_a_key_that_contradicts_the_switch_is_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=f"the command line also gives {key}="):
        compose_config(["model=qwen3_1.7b", "replicate=reference", override])


def test_keys_that_agree_with_the_switch_or_that_it_does_not_set_are_accepted():
    config = compose_config(["model=qwen3_1.7b", "replicate=reference", "mixed_precision=fp16", "lr=2e-4"])
    assert config.optim.mixed_precision == "fp16" and config.optim.lr == 2e-4
    cpu = compose_config(["model=qwen3_1.7b", "replicate=reference", "mixed_precision=no"])
    assert cpu.optim.mixed_precision == "no", "float32 is the release's own precision without CUDA"
    assert RunConfig.from_flat(cpu.to_flat()).replicate == "reference"


def test_models_the_release_never_ran_and_unknown_values_are_refused():
    with pytest.raises(ValueError, match="no prompt layout of the reference release for model=smollm2_135m"):
        compose_config(["model=smollm2_135m", "replicate=reference"])
    with pytest.raises(ValueError, match=r"replicate='refrence' is unknown \(did you mean 'reference'\?\)"):
        compose_config(["replicate=refrence"])
    assert replication_keys("none", "smollm2", "smollm2_135m") == {}


@pytest.mark.parametrize("gpus, precision", [("0", "no"), ("2", "fp16")])
def test_run_sh_with_replicate_reference_composes_without_a_clash(gpus, precision):
    env = {**os.environ, "LDMOLE_PRINT_ARGS": "1", "NUM_GPUS": gpus, "REPLICATE": "reference"}
    result = subprocess.run(["bash", "run.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True)
    config = compose_config([arg for arg in result.stdout.split("\0") if arg])
    assert config.replicate == "reference" and config.optim.mixed_precision == precision
