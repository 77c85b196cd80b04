"""A trained run writes adapters that ``from_pretrained`` loads, computing what the run's base with
``load_mole`` computes."""

from __future__ import annotations


import pytest
import torch

from ldmole import mole_parameters
from ldmole.experiment.adapter_info import AdapterInfo
from ldmole.experiment.models import load_base_model, load_tokenizer
from ldmole.experiment.pretrained import from_pretrained
from tests.helpers import DATA_DIR, tiny_run_config


@pytest.mark.slow
def test_a_trained_run_writes_an_adapter_that_from_pretrained_loads(tmp_path):
    from ldmole.experiment.trainer import train

    metrics = train(tiny_run_config(f"data_dir={DATA_DIR}", f"output_dir={tmp_path}", "max_steps=2",
                                    "train_max_examples=16", "eval_max_examples=8", "save_epoch_adapters=[1]"))
    for folder in ("adapter", "adapter_epoch1"):
        info = AdapterInfo.read(tmp_path / folder)
        assert (info.base_model, info.method, info.task, info.chat_format) == ("random:qwen3", "ldmole", "arc_e", "qwen3")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert f"| accuracy | {100 * metrics.accuracy:.2f} |" in card and "Mean active experts per token" in card
    model = from_pretrained(tmp_path / "adapter")
    assert not model.training
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    loaded = mole_parameters(model)
    assert saved.keys() == loaded.keys() and any(k.endswith("router.weight") for k in loaded)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), f"{name}: from_pretrained must apply the saved weights"
    # Training moved the adapter off its initialisation (lora_B starts at zero), so the check above
    # could not pass with a freshly initialised adapter.
    assert any(name.endswith("lora_B") and tensor.abs().sum() > 0 for name, tensor in saved.items())
    # The base is the run's: rebuilt from its seed, every frozen weight equals the run's base.
    from accelerate.utils import set_seed

    config = tiny_run_config()
    set_seed(config.seed)
    base = load_base_model(config.backbone, "causal_lm", load_tokenizer(config.backbone.tokenizer))
    params = dict(model.named_parameters())
    for name, param in base.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        key = name if name in params else f"{prefix}.base_layer.{leaf}"  # an adapted nn.Linear
        assert torch.equal(params[key], param), f"{name}: not the run's base weight"
    # And it computes what that base with the adapter loaded by load_mole computes.
    from ldmole import load_mole

    independent = load_mole(base, tmp_path / "adapter").eval()
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, independent(input_ids=ids).logits, atol=0, rtol=0)
