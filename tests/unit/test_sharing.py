"""Self-describing adapters: adapter_info.json and model card, from_pretrained, hub upload (mocked),
and PEFT export of plain-LoRA adapters."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldmole import MoLEConfig, get_mole_model, mole_parameters
from ldmole.experiment.adapter_info import AdapterInfo, model_card
from ldmole.experiment.data import get_task
from ldmole.experiment.models import load_base_model, load_tokenizer
from ldmole.experiment.peft_export import export_peft_lora
from ldmole.experiment.pretrained import from_pretrained, push_to_hub, save_adapter
from ldmole.experiment.run_config import compose_config
from tests.helpers import tiny_model, tiny_run_config, tokenizer_dir, trained_tiny_model


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
    """Records what push_to_hub asks of huggingface_hub.HfApi, and what an upload would send."""

    def __init__(self, private: bool = True) -> None:
        self.calls = []
        self.private = private  # whether the (possibly existing) repository is private
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def repo_info(self, repo_id, **kwargs):
        self.calls.append(("repo_info", repo_id, kwargs))
        return SimpleNamespace(private=self.private)

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        folder, patterns = Path(kwargs["folder_path"]), kwargs.get("allow_patterns") or ["*"]
        self.uploaded = {p.name: p.read_bytes() for p in folder.iterdir()
                         if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in patterns)}


def hub_info(**fields) -> AdapterInfo:
    """The info of an adapter of the hub's Qwen3-1.7B (``fields`` replace its values)."""
    values = dict(base_model="Qwen/Qwen3-1.7B", model_kind="causal_lm", method="ldmole", task="arc_c",
                  chat_format="qwen3", ldmole_version="0.2.0")
    return AdapterInfo(**{**values, **fields})


def tiny_adapter(folder, info: AdapterInfo):
    """A tiny Qwen3 adapter saved with ``info`` in ``folder``."""
    model = get_mole_model(tiny_model("qwen3", num_layers=2), MoLEConfig(router="topk", num_experts=2, r=2))
    return save_adapter(model, folder, info)


def test_push_to_hub_uploads_only_the_adapters_own_files(tmp_path):
    tiny_adapter(tmp_path, hub_info())
    (tmp_path / ".adapter.safetensors.abc123.tmp").write_bytes(b"left by a crash")
    (tmp_path / "notes.txt").write_text("private notes")
    api = FakeHubApi()
    url = push_to_hub(tmp_path, "me/ldmole-arc-c", api=api)
    assert url == "https://huggingface.co/me/ldmole-arc-c"
    assert api.calls[0] == ("create_repo", "me/ldmole-arc-c", {"private": True, "exist_ok": True, "repo_type": "model"})
    upload = api.calls[-1][1]
    assert upload["folder_path"] == str(tmp_path) and upload["repo_id"] == "me/ldmole-arc-c"
    names = ["README.md", "adapter.safetensors", "adapter_info.json", "mole_config.json"]
    assert upload["allow_patterns"] == names and sorted(api.uploaded) == names, "only the adapter's files go up"
    with pytest.raises(FileNotFoundError):
        push_to_hub(tmp_path / "empty", "me/x", api=FakeHubApi())
    hub_info().write(tmp_path / "info_only")
    with pytest.raises(FileNotFoundError, match="adapter.safetensors does not exist"):
        push_to_hub(tmp_path / "info_only", "me/x", api=FakeHubApi())


def test_push_to_hub_refuses_a_private_upload_to_an_existing_public_repository(tmp_path):
    tiny_adapter(tmp_path, hub_info())
    api = FakeHubApi(private=False)
    with pytest.raises(ValueError, match=r"me/public-repo already exists and is public.*private=False.*--public"):
        push_to_hub(tmp_path, "me/public-repo", api=api)
    assert not any(call[0] == "upload_folder" for call in api.calls), "nothing may be uploaded"
    push_to_hub(tmp_path, "me/public-repo", private=False, api=api)
    assert api.calls[-1][0] == "upload_folder"


def test_push_to_hub_publishes_the_hub_id_given_for_a_local_base_model(tmp_path):
    from accelerate.utils import set_seed

    tokenizer = load_tokenizer(str(tokenizer_dir("qwen3")))
    set_seed(7)
    base = load_base_model(tiny_run_config().backbone, "causal_lm", tokenizer)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = compose_config({"model": "tiny_qwen3", "task": "arc_e", "model_source": str(tmp_path / "base"),
                             "tokenizer": None, "seed": 7})
    info = AdapterInfo.from_run(config, get_task("arc_e"))
    assert (info.base_model, info.tokenizer, info.tokenizer_in_folder) == (str(tmp_path / "base"), None, True)
    get_mole_model(base, MoLEConfig(router="topk", num_experts=2, r=2))
    save_adapter(base, tmp_path / "adapter", info)
    assert (tmp_path / "adapter" / "tokenizer.json").is_file(), "the local base model's tokenizer travels along"
    with pytest.raises(ValueError, match=r"adapter_info.json names the local base model base_model=.*base_model_id="):
        push_to_hub(tmp_path / "adapter", "me/x", api=FakeHubApi())
    api = FakeHubApi()
    push_to_hub(tmp_path / "adapter", "me/x", api=api, base_model_id="Qwen/Qwen3-1.7B")
    published = json.loads(api.uploaded["adapter_info.json"])
    assert published["base_model"] == "Qwen/Qwen3-1.7B" and published["tokenizer"] is None
    assert {"tokenizer.json", "tokenizer_config.json", "adapter.safetensors"} <= set(api.uploaded)
    assert "base_model: Qwen/Qwen3-1.7B\n" in api.uploaded["README.md"].decode()
    assert not [name for name, data in api.uploaded.items() if str(tmp_path).encode() in data], \
        "no uploaded file may name a local path"
    assert AdapterInfo.read(tmp_path / "adapter").base_model == str(tmp_path / "base"), "the local folder is kept"


def test_a_local_tokenizer_travels_in_the_adapter_folder_instead_of_its_path(tmp_path):
    from ldmole.experiment.pretrained import load_adapter_tokenizer

    config = tiny_run_config()
    info = AdapterInfo.from_run(config, get_task("arc_e"))
    assert (info.tokenizer, info.tokenizer_in_folder) == (None, True)
    save_adapter(trained_tiny_model(config), tmp_path / "adapter", info)
    text = (tmp_path / "adapter" / "adapter_info.json").read_text()
    assert '"tokenizer": null' in text and '"tokenizer_in_folder": true' in text
    assert str(tokenizer_dir("qwen3").resolve()) not in text and "tokenizer_source" not in text
    original = load_tokenizer(str(tokenizer_dir("qwen3")))
    assert load_adapter_tokenizer(tmp_path / "adapter").get_vocab() == original.get_vocab()
    marked = load_tokenizer(str(tokenizer_dir("qwen3")))
    marked.add_tokens(["<ldmole-test>"])
    save_adapter(trained_tiny_model(config), tmp_path / "given", info, tokenizer=marked)
    assert "<ldmole-test>" in load_adapter_tokenizer(tmp_path / "given").get_vocab(), "the given object is saved"
    hub = AdapterInfo.from_run(tiny_run_config("tokenizer=Qwen/Qwen3-1.7B"), get_task("arc_e"))
    assert (hub.tokenizer, hub.tokenizer_in_folder) == ("Qwen/Qwen3-1.7B", False), "a hub id is recorded as it is"
    old = tmp_path / "old"  # written before 0.2.1: the absolute tokenizer path, no tokenizer files
    old.mkdir()
    (old / "adapter_info.json").write_text(json.dumps({**json.loads(text), "tokenizer": str(tokenizer_dir("qwen3")),
                                                      "tokenizer_in_folder": None}))
    assert load_adapter_tokenizer(old).get_vocab() == original.get_vocab()


@pytest.mark.parametrize("content, problem", [
    ('{"base_model": "Qwen/Qwen3-1.7B",\n  "method": }', r"not valid JSON \(line 2, column 13"),
    ('["Qwen/Qwen3-1.7B"]', "holds a JSON list, not an object"),
    ('{"base_model": "Qwen/Qwen3-1.7B", "method": "ldmole"}',
     r"missing required keys \['model_kind', 'task', 'chat_format', 'ldmole_version'\]"),
])
def test_a_malformed_adapter_info_names_the_file_and_the_problem(tmp_path, content, problem):
    (tmp_path / "adapter_info.json").write_text(content)
    with pytest.raises(ValueError, match=f"{tmp_path / 'adapter_info.json'}: {problem}"):
        AdapterInfo.read(tmp_path)


def test_from_pretrained_passes_check_base_to_load_mole(tmp_path, monkeypatch):
    from ldmole.experiment import pretrained

    config = tiny_run_config()
    save_adapter(trained_tiny_model(config), tmp_path, AdapterInfo.from_run(config, get_task("arc_e")))
    calls = []
    monkeypatch.setattr(pretrained, "load_mole",
                        lambda model, folder, check_base=True: calls.append(check_base) or model)
    from_pretrained(tmp_path, check_base=False)
    from_pretrained(tmp_path)
    assert calls == [False, True]


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
    assert command.main([str(tmp_path), "me/repo", "--base-model-id", "Qwen/Qwen3-1.7B"]) == 0
    assert calls[-1] == ((str(tmp_path), "me/repo"), {"private": True, "base_model_id": "Qwen/Qwen3-1.7B"})
