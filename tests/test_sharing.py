"""Self-describing adapters: adapter_info.json and model card, from_pretrained, hub upload (mocked),
and PEFT export of plain-LoRA adapters."""

from __future__ import annotations

import json

import pytest
import torch

from ldmole import MoLEConfig, get_mole_model, mole_parameters
from ldmole.experiment.adapter_info import AdapterInfo, model_card
from ldmole.experiment.data import get_task
from ldmole.experiment.models import load_base_model, load_tokenizer
from ldmole.experiment.peft_export import export_peft_lora
from ldmole.experiment.pretrained import from_pretrained, push_to_hub, save_adapter
from ldmole.experiment.run_config import RunConfig, compose_config
from tests.helpers import DATA_DIR, tiny_model, tokenizer_dir



def tiny_run_config(*overrides: str) -> RunConfig:
    """The composed config of a tiny random Qwen3 run on ARC-Easy."""
    return compose_config(["model=tiny_qwen3", "task=arc_e", f"tokenizer={tokenizer_dir('qwen3')}", "seed=7",
                           *overrides])


def trained_tiny_model(config: RunConfig, router: str = "sparsegen"):
    """The run's tiny random base built as the trainer builds it (seeded), with perturbed adapter weights."""
    from accelerate.utils import set_seed

    set_seed(config.seed)
    model = load_base_model(config.backbone, "causal_lm", load_tokenizer(config.backbone.tokenizer))
    get_mole_model(model, MoLEConfig(router=router, num_experts=1 if router == "lora" else 4, r=4))
    with torch.no_grad():
        for p in mole_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_from_pretrained_rebuilds_base_and_adapter_from_the_folder_alone(tmp_path):
    config = tiny_run_config()
    model = trained_tiny_model(config)
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    info = AdapterInfo.from_run(config, get_task("arc_e"), model)
    save_adapter(model, tmp_path / "adapter", info, metrics={"accuracy": 0.5, "num_eval_examples": 10})
    saved = json.loads((tmp_path / "adapter" / "adapter_info.json").read_text())
    assert saved["base_model"] == "random:qwen3" and saved["method"] == "ldmole" and saved["task"] == "arc_e"
    assert saved["chat_format"] == "qwen3" and saved["ldmole_version"]
    loaded = from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_from_pretrained_takes_another_location_of_the_base_model(tmp_path):
    config = tiny_run_config()
    model = trained_tiny_model(config)
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    from accelerate.utils import set_seed

    set_seed(config.seed)  # the same seed builds the same base weights
    load_base_model(config.backbone, "causal_lm", load_tokenizer(config.backbone.tokenizer)).save_pretrained(tmp_path / "base")
    info = AdapterInfo.from_run(tiny_run_config("model_source=someone/not-on-this-machine"), get_task("arc_e"))
    save_adapter(model, tmp_path / "adapter", info)
    with pytest.raises(OSError, match="someone/not-on-this-machine"):
        from_pretrained(tmp_path / "adapter")
    loaded = from_pretrained(tmp_path / "adapter", base_model=str(tmp_path / "base"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-6, rtol=0)


def test_adapter_without_info_says_to_pass_the_base_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="base_model="):
        AdapterInfo.read(tmp_path)


def test_model_card_names_method_base_task_metrics_and_routing():
    info = AdapterInfo(base_model="Qwen/Qwen3-1.7B", model_kind="causal_lm", method="ldmole", task="arc_c",
                       chat_format="qwen3", ldmole_version="0.2.0", base_model_revision="abc123")
    routing = {"avg_active_experts": 3.25, "zero_activation_rate": 0.0,
               "per_layer": {"0": {"avg_active_experts": 4.5}, "1": {"avg_active_experts": 2.0}},
               "lambda": {"mean": -1.2, "quantiles": {"q05": -2.0, "q50": -1.1, "q95": -0.4}}}
    card = model_card(info, {"accuracy": 0.7512, "num_eval_examples": 299, "eval_split": "validation", "routing": routing})
    assert card.startswith("---\nlibrary_name: ldmole\nbase_model: Qwen/Qwen3-1.7B\n")
    assert "# ldmole adapter: Qwen/Qwen3-1.7B on arc_c" in card and "revision `abc123`" in card
    assert "| accuracy | 75.12 |" in card and "| examples | 299 (validation split) |" in card
    assert "Mean active experts per token: 3.25" in card and "| 0 | 4.50 |" in card and "| 1 | 2.00 |" in card
    assert "q05 -2.0, q50 -1.1, q95 -0.4" in card and 'ldmole.from_pretrained("' in card


class FakeHubApi:
    """Records what push_to_hub asks of huggingface_hub.HfApi."""

    def __init__(self) -> None:
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


def test_push_to_hub_creates_the_repository_and_uploads_the_folder(tmp_path):
    AdapterInfo(base_model="Qwen/Qwen3-1.7B", model_kind="causal_lm", method="ldmole", task="arc_c",
                chat_format="qwen3", ldmole_version="0.2.0").write(tmp_path)
    api = FakeHubApi()
    url = push_to_hub(tmp_path, "me/ldmole-arc-c", api=api)
    assert url == "https://huggingface.co/me/ldmole-arc-c"
    assert api.calls[0] == ("create_repo", "me/ldmole-arc-c", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert api.calls[1][1]["folder_path"] == str(tmp_path) and api.calls[1][1]["repo_id"] == "me/ldmole-arc-c"
    with pytest.raises(FileNotFoundError):
        push_to_hub(tmp_path / "empty", "me/x", api=FakeHubApi())


@pytest.mark.parametrize("kind", ["causal_lm", "classification"])
def test_lora_adapter_exported_to_peft_gives_the_same_logits(kind, tmp_path):
    from peft import PeftModel

    model = get_mole_model(tiny_model("llama", task=kind, seed=3), MoLEConfig(router="lora", num_experts=1, r=4, alpha=8))
    with torch.no_grad():
        for p in mole_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.tensor([[3, 14, 15, 92, 65], [35, 89, 79, 32, 38]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_peft_lora(model, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_model("llama", task=kind, seed=3), str(tmp_path)).eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mixture_adapter_export_to_peft_explains_why_not(tmp_path):
    model = get_mole_model(tiny_model("qwen3"), MoLEConfig(router="sparsegen", num_experts=4))
    with pytest.raises(ValueError, match="PEFT's LoRA has one update per module and no router"):
        export_peft_lora(model, tmp_path)


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
    assert not model.training and any(k.endswith("router.weight") for k in mole_parameters(model))


def test_export_peft_command_writes_peft_files_for_lora_and_refuses_a_mixture(tmp_path, capsys):
    from ldmole.cli import export_peft

    config = tiny_run_config("method=lora")
    save_adapter(trained_tiny_model(config, router="lora"), tmp_path / "lora", AdapterInfo.from_run(config, get_task("arc_e")))
    assert export_peft.main([str(tmp_path / "lora"), str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    config = tiny_run_config()
    save_adapter(trained_tiny_model(config), tmp_path / "mole", AdapterInfo.from_run(config, get_task("arc_e")))
    assert export_peft.main([str(tmp_path / "mole"), str(tmp_path / "nope")]) == 2
    assert "no router" in capsys.readouterr().err and not (tmp_path / "nope").exists()


def test_push_to_hub_command_passes_folder_repo_and_privacy(monkeypatch, tmp_path, capsys):
    from ldmole.cli import push_to_hub as command
    from ldmole.experiment import pretrained

    calls = []
    monkeypatch.setattr(pretrained, "push_to_hub", lambda *args, **kwargs: calls.append((args, kwargs)) or "url")
    assert command.main([str(tmp_path), "me/repo", "--public"]) == 0
    assert calls == [((str(tmp_path), "me/repo"), {"private": False})] and "url" in capsys.readouterr().out
