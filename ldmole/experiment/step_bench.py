"""Whole training steps of every method, through the trainer and through the library alone (``ldmole-bench-step``).

One step = forward, task loss, the method's routing losses, backward, and the AdamW optimiser step, on one
fixed batch, for every method (:data:`METHODS`: LoRA r=8, LoRA r=64 of ours and of PEFT, softmax, MoLA,
ReMoLE, LD-MoLE, LD-MoLE with the sparsity loss; or any ``configs/methods`` file), measured along two code paths:

- ``trainer``: what :class:`~.trainer.Trainer` runs per optimiser step. Each method's config is composed with
  :func:`~.run_config.compose_config` (its model file, method file, the bench's keys and the user's
  ``KEY=VALUE`` overrides), and the model, accelerator, loss terms, ReMoLE controller and ``Trainer`` are built
  with the trainer module's own functions (``make_accelerator``, ``Run.mole_model``, ``routing_loss_terms``,
  ``remole_controller``, ``Trainer(...)``); a step is ``Trainer.optimizer_step`` on one micro-batch (forward
  through ``SelectedLogits``, routing records, task loss, routing losses, non-finite flags and running sums,
  ``accelerator.backward``, gradient clipping, ``AdamW.step``, ``zero_grad``, lr schedule, controller update)
  and the step counter. Not included: data loading (the batch is built once), the log line written every
  ``log_every`` steps (a host sync), checkpoints, evaluation.
- ``library``: the library API alone, as a user's own loop: the same base model (``Run.base_model``),
  ``ldmole.get_mole_model(model, config.mole)``, the model's full forward (its own classification head),
  float32 cross-entropy, the method's routing losses from :mod:`ldmole.core.losses` (load balance, sparsity,
  z-loss, ReMoLE's controller) with the method's coefficients, backward, ``torch.optim.AdamW.step`` (same lr
  and weight decay) and ``zero_grad(set_to_none=True)``. No gradient clipping, no accelerate. The PEFT
  LoRA (``peft_lora_r64``) is measured on this path only: ``peft.get_peft_model`` with
  ``LoraConfig(r, lora_alpha, lora_dropout)`` of the method's ``mole`` settings on the same
  ``target_modules``, the classification head in ``modules_to_save`` (ldmole trains it too).

The task is CoLA (sequence classification, the task kind's model class); ``data="cola"`` uses ``batch`` CoLA
training sentences drawn with the seed and collated by the trainer's ``train_collate`` (its own prompt
format, right padding), ``data="random"`` random token ids ``[batch, seq_len]`` (no padding). Models:
``smollm2_135m`` (real weights, offline), the width presets :data:`WIDTH_PRESETS` (random weights of
Qwen3-1.7B's or Llama-3.1-8B's widths and vocabulary, ``layers`` decoder layers), or any configs/models file.
A random model is built once by the library's ``random:<family>`` loader and saved to a work folder that
every variant then loads (``model_source=<folder>``), so that a 28-layer model is initialised once.

Frozen base weights are shared: after a variant's model is built and moved to the device, each frozen
parameter equal (``torch.equal``) to the one of the same name (``.base_layer`` and PEFT's ``base_model.model.``
dropped) in an earlier variant is replaced by that one, so N variants hold one copy of the base
(``share_weights=False`` turns this off). Trainable parameters, optimiser state and activations are each
variant's own.

Timing: variants run round-robin (one step of each per round, the order rotated every round) so that drift
and other processes' load hit every variant alike; ``warmup`` untimed rounds, then the median (and min) of
``steps`` timed rounds, with ``torch.cuda.synchronize`` around each step on CUDA. tokens/s counts the
batch's real (non-padding) tokens. Ratios: each row's median over the ``lora_r64`` row of the same path
(PEFT's over the library ``lora_r64`` row), and per method trainer ÷ library.

Memory (one extra step per variant after timing; gradients are None before it, AdamW's state exists):

- ``peak MB`` on CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus ``memory_allocated()``
  before it: activations, temporaries, gradients, the optimiser's temporaries; not the weights or the
  optimiser state that exist before the step.
- ``peak MB`` on CPU: the same quantity from the CPU allocator: every allocation and free that
  ``torch.profiler`` (``profile_memory=True``) reports during the step, replayed in order, the running
  sum's maximum (:func:`ldmole.experiment.bench.cpu_peak_bytes`). Memory that MKL / oneDNN allocate
  outside PyTorch's allocator is not seen. Neither number is the process's RSS.
- ``state MB``: what the variant keeps between steps besides the shared base: its trainable parameters and
  AdamW's state (exp_avg, exp_avg_sq, step), counted from the tensors.

``compile=True``: the trainer path sets ``OptimConfig``'s ``compile`` key in every config and builds the model
as ``train()`` does (``trainer.training_model``: ``compile_mole_model``, one compiled graph for every decoder layer);
the library path calls ``ldmole.core.compile.compile_mole_model`` itself (PEFT: its decoder layers with the same
inductor options). The warm-up rounds compile (at least 3 by default); graphs compiled during timed steps are
counted and noted. A variant whose step raises is reported with its error and dropped from the later rounds.

This module only measures; it makes no claim about what the numbers should be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core import losses
from ..core.injection import get_mole_model, mole_parameters
from ..core.records import routing_records
from ..core.routers import aux_losses_of
from . import bench
from .data.collation import train_collate
from .run import Run
from .run_config import REPO_ROOT, OptimConfig, RunConfig, available, compose_config

__all__ = ["MethodSpec", "WidthPreset", "StepBenchSettings", "Variant", "METHODS", "DEFAULT_METHODS", "WIDTH_PRESETS",
           "REFERENCE", "PATHS", "BASE", "DECODE_METHODS", "run_step_benchmark", "check_settings", "method_spec",
           "format_table", "BenchContext", "FrozenWeights", "git_state", "compile_key", "build_trainer_variant",
           "build_library_variant", "quiet_loading", "resolved", "TIMING_DEFAULTS", "bench_session",
           "library_compile"]


@dataclass(frozen=True)
class MethodSpec:
    """A benchmarked method: its name, its label in the table, its configs/methods file and extra keys."""

    name: str
    label: str
    method: str
    overrides: tuple = ()
    peft: bool = False  # PEFT's LoraConfig instead of ldmole (library path only)


_R64 = (("mole.r", 64), ("mole.alpha", 128.0))  # rank 64 at the scaling of r=8 / alpha=16 (alpha / r = 2)
METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("lora_r8", "lora r8", "lora"),
    MethodSpec("lora_r64", "lora r64 (ours)", "lora", _R64),
    MethodSpec("peft_lora_r64", "peft lora r64", "lora", _R64, peft=True),
    MethodSpec("softmax", "softmax", "softmax"),
    MethodSpec("mola_8888", "mola_8888", "mola_8888"),
    MethodSpec("remole", "remole", "remole"),
    MethodSpec("ldmole", "ldmole", "ldmole"),
    MethodSpec("ldmole_sparse_k2", "ldmole_sparse_k2", "ldmole_sparse_k2"),
)}
DEFAULT_METHODS = tuple(METHODS)
REFERENCE = "lora_r64"
PATHS = ("trainer", "library")
TASK = "cola"  # sequence classification: one cheap head, the same model class on both paths
CPU_LAYERS = 2  # default depth of a width preset on the CPU (all of the model's layers on CUDA)


@dataclass(frozen=True)
class WidthPreset:
    """A random model with a real model's widths: its model file, ``random:<family>`` and tokenizer folder."""

    model_file: str
    family: str
    tokenizer: str  # <data_dir>/tokenizers/<tokenizer>
    layers: int     # the real model's depth
    vocab_size: int  # the real model's embedding rows (whatever the tokenizer's size)
    widths: tuple   # random_init entries


WIDTH_PRESETS: dict[str, WidthPreset] = {
    "qwen3_1.7b_widths": WidthPreset("qwen3_1.7b", "qwen3", "qwen3", 28, 151936, (
        ("hidden_size", 2048), ("intermediate_size", 6144), ("num_attention_heads", 16),
        ("num_key_value_heads", 8), ("head_dim", 128))),
    "llama3.1_8b_widths": WidthPreset("llama3.1_8b", "llama", "llama3", 32, 128256, (
        ("hidden_size", 4096), ("intermediate_size", 14336), ("num_attention_heads", 32),
        ("num_key_value_heads", 8), ("head_dim", 128))),
}
_FAMILY_TOKENIZERS = {"qwen3": "qwen3", "llama": "llama3"}


@dataclass
class StepBenchSettings:
    """What one ``ldmole-bench-step`` run measures (the command's options, same names and defaults)."""

    model: str = "smollm2_135m"
    layers: Optional[int] = None        # width presets / random models: decoder layers (None: 2 on CPU, all on CUDA)
    device: str = "auto"
    dtype: Optional[str] = None         # None: bfloat16 on CUDA, float32 on CPU
    compile: bool = False
    seq_len: Optional[int] = None       # data="random" only (None: 256)
    batch: int = 16
    methods: Optional[list] = None      # None: DEFAULT_METHODS (DECODE_METHODS with decode=True)
    paths: list = field(default_factory=lambda: list(PATHS))
    steps: Optional[int] = None         # None: 3 on the CPU, 10 on CUDA
    warmup: Optional[int] = None        # None: 1 on the CPU, 3 on CUDA
    data: str = "cola"
    data_dir: Optional[str] = None      # None: $LDMOLE_DATA_DIR, else the repository's test fixture
    tokenizer: Optional[str] = None     # None: the model's, or <data_dir>/tokenizers/<family> for random models
    seed: int = 42
    threads: Optional[int] = None
    share_weights: bool = True
    overrides: dict = field(default_factory=dict)  # KEY=VALUE config keys applied to every method
    work_dir: Optional[str] = None
    decode: bool = False                # the decode benchmark (ldmole.experiment.decode_bench) instead
    new_tokens: int = 32                # decode: tokens generated per round
    prompt_len: Optional[int] = None    # decode with data="random": prompt length (None: 32)
    decode_batch: int = 1               # decode: sequences generated together
    profile: Optional[list] = None      # methods (or method/path) whose torch.profiler op table is printed
    saved: Optional[list] = None        # methods (or method/path) whose tensors saved for the backward are listed
    profile_rows: int = 25              # rows of each --profile / --saved table

    def method_names(self) -> list[str]:
        if self.methods is not None:
            return list(self.methods)
        return list(DECODE_METHODS if self.decode else DEFAULT_METHODS)


DEFAULT_SEQ_LEN = 256
DEFAULT_PROMPT_LEN = 32
BASE = "base"  # decode only: the base model without an adapter
DECODE_METHODS = (BASE, REFERENCE, "ldmole")


# --------------------------------------------------------------------------------------------------
# Settings.
# --------------------------------------------------------------------------------------------------


def method_spec(name: str) -> MethodSpec:
    """The spec of a bench method name, or of a configs/methods file used as is."""
    if name in METHODS:
        return METHODS[name]
    if name in available("methods"):
        return MethodSpec(name, name, name)
    raise ValueError(f"--methods: unknown method {name!r}; choose from {', '.join(METHODS)} or a configs/methods "
                     f"file ({', '.join(available('methods'))})")


def _is_random_model(settings: StepBenchSettings) -> bool:
    return settings.model in WIDTH_PRESETS or _model_file_source(settings.model).startswith("random:")


def _model_file_source(model: str) -> str:
    if model in WIDTH_PRESETS:
        return f"random:{WIDTH_PRESETS[model].family}"
    import yaml

    path = REPO_ROOT / "configs" / "models" / f"{model}.yaml"
    return str((yaml.safe_load(path.read_text()) or {}).get("model_source", "")) if path.is_file() else ""


def resolve_dtype(settings: StepBenchSettings, device: torch.device) -> str:
    if settings.dtype is not None:
        return settings.dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def default_data_dir() -> Path:
    """``$LDMOLE_DATA_DIR`` when set, else the repository's 8-row test fixture (tests/fixtures/data)."""
    env = os.environ.get("LDMOLE_DATA_DIR")
    return Path(env) if env else REPO_ROOT / "tests" / "fixtures" / "data"


TIMING_DEFAULTS = {"cpu": (3, 1), "cuda": (10, 3)}  # device type -> (steps, warmup)
COMPILE_WARMUP = 3  # default warm-up rounds with --compile (the first compiles, the next may recompile once)


def resolved(settings: StepBenchSettings) -> StepBenchSettings:
    """``settings`` with the device-dependent defaults filled in (steps, warmup, dtype); checked first."""
    check_settings(settings)
    device = bench.resolve_device(settings.device)
    steps, warmup = TIMING_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    warmup = max(warmup, COMPILE_WARMUP) if settings.compile else warmup
    return dataclasses.replace(settings, steps=settings.steps if settings.steps is not None else steps,
                               warmup=settings.warmup if settings.warmup is not None else warmup,
                               dtype=resolve_dtype(settings, device))


def check_settings(settings: StepBenchSettings) -> None:
    """Raises ValueError naming the option and the fix for settings that cannot run (before anything loads)."""
    if settings.steps is not None and settings.steps < 1:
        raise ValueError(f"--steps must be >= 1 (got {settings.steps})")
    for name in ("batch",):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name} must be >= 1 (got {getattr(settings, name)})")
    if settings.warmup is not None and settings.warmup < 0:
        raise ValueError(f"--warmup must be >= 0 (got {settings.warmup})")
    if settings.compile and settings.warmup is not None and settings.warmup < 1:
        raise ValueError("--compile needs --warmup >= 1: the first step of each variant compiles it")
    if settings.data not in ("cola", "random"):
        raise ValueError(f"--data {settings.data!r}: choose cola (real CoLA sentences) or random (random tokens)")
    if settings.seq_len is not None and not settings.decode:
        if settings.data != "random":
            raise ValueError("--seq-len applies to --data random; CoLA batches have the length of their sentences "
                             "(drop --seq-len or pass --data random)")
        if settings.seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2 (got {settings.seq_len})")
    if settings.dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"--dtype {settings.dtype!r}: choose float32 or bfloat16")
    models = sorted(set(available("models")) | set(WIDTH_PRESETS))
    if settings.model not in models:
        raise ValueError(f"--model {settings.model!r} is unknown; choose one of {', '.join(models)}")
    if settings.layers is not None:
        if settings.layers < 1:
            raise ValueError(f"--layers must be >= 1 (got {settings.layers})")
        if not _is_random_model(settings):
            raise ValueError(f"--layers applies to random models (the width presets {', '.join(WIDTH_PRESETS)} and "
                             f"random: model files); {settings.model} is used with all its layers")
    methods = settings.method_names()
    if not methods:
        raise ValueError(f"--methods is empty; name at least {REFERENCE}")
    for name in methods:
        if name == BASE and settings.decode:
            continue
        if name == BASE:
            raise ValueError(f"--methods {BASE}: the base model alone is measured by --decode only")
        method_spec(name)
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods names a method twice: {','.join(methods)}")
    if REFERENCE not in methods:
        raise ValueError(f"--methods must include {REFERENCE}: every ratio is taken against LoRA r=64 (ours)")
    for name in ("new_tokens", "decode_batch"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(settings, name)})")
    if settings.prompt_len is not None:
        if settings.data != "random" or not settings.decode:
            raise ValueError("--prompt-len applies to --decode --data random; with --data cola the prompt is a CoLA "
                             "sentence in the model's prompt format")
        if settings.prompt_len < 1:
            raise ValueError(f"--prompt-len must be >= 1 (got {settings.prompt_len})")
    if settings.saved and settings.decode:
        raise ValueError("--saved lists what a training step keeps for its backward; decoding has no backward "
                         "(drop --saved or --decode)")
    for option in ("profile", "saved"):
        for name in getattr(settings, option) or []:
            method, _, path = name.partition("/")
            if method not in methods or (path and (settings.decode or path not in settings.paths)):
                variants = methods if settings.decode else [f"{m}/{p}" for m in methods for p in settings.paths]
                raise ValueError(f"--{option} {name!r} is not a measured variant; name one of --methods (or "
                                 f"method/path): {', '.join(variants)}")
    if settings.profile_rows < 1:
        raise ValueError(f"--profile-rows must be >= 1 (got {settings.profile_rows})")
    if settings.decode and settings.compile:
        raise ValueError("--compile is not measured with --decode: the KV cache grows every step, so each length would "
                         "be a graph of its own; drop --compile")
    if settings.decode and settings.seq_len is not None:
        raise ValueError("--seq-len is the training batch's length; --decode takes --prompt-len and --new-tokens")
    unknown = [p for p in settings.paths if p not in PATHS]
    if unknown or not settings.paths:
        raise ValueError(f"--paths {','.join(settings.paths)}: choose from {','.join(PATHS)}")
    if "library" not in settings.paths and any(method_spec(m).peft for m in methods if m != BASE):
        raise ValueError("--methods peft_lora_r64 runs on the library path only; add library to --paths or drop it")
    data_dir = Path(settings.data_dir) if settings.data_dir else default_data_dir()
    if not (data_dir / "glue_cola").is_dir():
        raise ValueError(f"--data-dir {data_dir}: no glue_cola/ folder there (the trainer path reads CoLA even with "
                         "--data random); point --data-dir (or LDMOLE_DATA_DIR) at the data folder")
    bench.resolve_device(settings.device)
    if settings.overrides:
        model_file = WIDTH_PRESETS[settings.model].model_file if settings.model in WIDTH_PRESETS else settings.model
        try:  # the keys and values alone (no model is built)
            compose_config({"model": model_file, "task": TASK, **settings.overrides})
        except ValueError as error:
            raise ValueError(f"KEY=VALUE overrides: {error}") from None


def compile_key() -> Optional[tuple[str, Any]]:
    """(name, value to enable it) of ``OptimConfig``'s compile key when the config has one, else None."""
    spec = {f.name: f for f in dataclasses.fields(OptimConfig)}.get("compile")
    if spec is None:
        return None
    default = spec.default if spec.default is not dataclasses.MISSING else None
    if isinstance(default, bool) or default is None:
        return "compile", True
    choices = [c for c in spec.metadata.get("choices", ()) if str(c).lower() not in ("no", "none", "off", "false")]
    if not choices:
        raise ValueError(f"OptimConfig.compile (default {default!r}) has no value the bench knows to enable it; "
                         "pass compile=<value> as an override instead of --compile")
    return "compile", choices[0]


def git_state() -> dict:
    """The repository's commit (short) and whether the working tree has uncommitted changes (read only)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # git status must not write the index

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, env=env)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


# --------------------------------------------------------------------------------------------------
# Shared frozen weights.
# --------------------------------------------------------------------------------------------------


class FrozenWeights:
    """Frozen base parameters shared by every variant, by their name in the base model."""

    def __init__(self) -> None:
        self.by_name: dict[str, nn.Parameter] = {}
        self.shared_bytes = 0

    @staticmethod
    def canonical(name: str) -> str:
        """The base model's name of a parameter of an adapted model (ldmole or PEFT)."""
        if name.startswith("base_model.model."):
            name = name[len("base_model.model."):]
        return name.replace(".base_layer.", ".")

    def share(self, model: nn.Module) -> int:
        """Replaces every frozen parameter of ``model`` equal to a registered one by it; registers the others.
        Returns the bytes now shared (freed once nothing else holds the replaced tensors)."""
        shared = 0
        for module_name, module in model.named_modules():
            for param_name, param in list(module.named_parameters(recurse=False)):
                if param.requires_grad:
                    continue
                key = self.canonical(f"{module_name}.{param_name}" if module_name else param_name)
                have = self.by_name.get(key)
                if have is None:
                    self.by_name[key] = param
                    continue
                if have is param:
                    continue
                try:
                    same = (type(have) is type(param) and have.shape == param.shape and have.dtype == param.dtype
                            and have.device == param.device and bool(torch.equal(have, param)))
                except (RuntimeError, TypeError):
                    same = False
                if same:
                    setattr(module, param_name, have)
                    shared += param.numel() * param.element_size()
        self.shared_bytes += shared
        return shared

    def total_bytes(self) -> int:
        seen, total = set(), 0
        for p in self.by_name.values():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total


# --------------------------------------------------------------------------------------------------
# Variants.
# --------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One benchmarked (method, path): its step, trainable parameters, optimiser and model."""

    spec: MethodSpec
    path: str
    step: Callable[[], None]
    params: list
    optimizer: Any
    model: nn.Module
    notes: list = field(default_factory=list)
    compiled: Optional[str] = None
    error: Optional[str] = None
    fingerprint: Optional[list] = None
    timed_compiles: int = 0  # graphs dynamo compiled during this variant's timed steps (should stay 0)

    @property
    def name(self) -> str:
        return f"{self.spec.name}/{self.path}"


class _Stepper:
    """The interface :func:`bench.cpu_peak_bytes` / :func:`bench.cuda_peak_bytes` measure: zero(), then one step."""

    def __init__(self, variant: Variant) -> None:
        self.variant = variant

    def zero(self) -> None:
        for p in self.variant.params:
            p.grad = None

    def __call__(self) -> None:
        self.variant.step()


def _fingerprint(params: list) -> list:
    with torch.no_grad():
        return [torch.stack([p.detach().double().sum(), p.detach().double().abs().sum()]).cpu() for p in params]


def _compiled(model: nn.Module) -> bool:
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def _raise_recompile_limits() -> dict:
    """Dynamo recompiles a model's code for every model instance; with many variants the default limit
    (8) would silently leave later variants in eager mode. Raised for the run; returns what was set."""
    import torch._dynamo

    cfg, set_to = torch._dynamo.config, {}
    for name, value in (("recompile_limit", 512), ("cache_size_limit", 512),
                        ("accumulated_recompile_limit", 8192), ("accumulated_cache_size_limit", 8192)):
        if hasattr(cfg, name) and getattr(cfg, name) < value:
            setattr(cfg, name, value)
            set_to[name] = value
    return set_to


class BenchContext:
    """What the variants of one run share: settings, device, dtype, work folder, frozen weights, the batch."""

    def __init__(self, settings: StepBenchSettings, log: Callable[[str], None]) -> None:
        self.settings, self.log = settings, log
        self.device = bench.resolve_device(settings.device)
        self.dtype_name = resolve_dtype(settings, self.device)
        self.dtype = torch.bfloat16 if self.dtype_name == "bfloat16" else torch.float32
        self.data_dir = Path(settings.data_dir) if settings.data_dir else default_data_dir()
        self.work = Path(tempfile.mkdtemp(prefix="ldmole-bench-step-", dir=settings.work_dir))
        self.frozen = FrozenWeights()
        self.templates: dict[str, str] = {}
        self.layers = self._layers()
        self.compile = compile_key() if settings.compile else None
        self.batch: Optional[dict] = None
        self.model_info: dict = {}
        self._noted: set = set()

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def _layers(self) -> Optional[int]:
        s = self.settings
        if not _is_random_model(s):
            return None
        if s.layers is not None:
            return s.layers
        if s.model in WIDTH_PRESETS:
            return WIDTH_PRESETS[s.model].layers if self.device.type == "cuda" else CPU_LAYERS
        return None  # a random model file: its own depth

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    # ---- configs ------------------------------------------------------------------------------------

    def tokenizer(self) -> Optional[str]:
        s = self.settings
        if s.tokenizer:
            return s.tokenizer
        if s.model in WIDTH_PRESETS:
            return str(self.data_dir / "tokenizers" / WIDTH_PRESETS[s.model].tokenizer)
        source = _model_file_source(s.model)
        if source.startswith("random:"):
            return str(self.data_dir / "tokenizers" / _FAMILY_TOKENIZERS.get(source.split(":", 1)[1], "qwen3"))
        return None

    def common_keys(self, name: str, task: str = TASK) -> dict:
        """The keys every method's config gets (before the method's own and the user's overrides)."""
        s = self.settings
        model_file = WIDTH_PRESETS[s.model].model_file if s.model in WIDTH_PRESETS else s.model
        keys: dict[str, Any] = {
            "model": model_file, "task": task, "seed": s.seed, "data_dir": str(self.data_dir),
            "batch_size": s.batch, "per_device_batch_size": s.batch, "eval_batch_size": s.batch,
            "train_max_examples": s.batch, "eval_max_examples": 1, "torch_dtype": self.dtype_name,
            "mixed_precision": "bf16" if self.dtype == torch.bfloat16 else "no",
            "output_dir": str(self.work / "runs" / name.replace("/", "_")),
        }
        tokenizer = self.tokenizer()
        if tokenizer:
            keys["tokenizer"] = tokenizer
        if self.compile is not None:
            keys[self.compile[0]] = self.compile[1]
        return keys

    def config(self, spec: MethodSpec, name: str, task: str = TASK) -> RunConfig:
        """The method's composed config: model file, method file, the bench's keys, the spec's, the user's."""
        keys = {**self.common_keys(name, task), "method": spec.method, **dict(spec.overrides)}
        keys.update(self.settings.overrides)
        if _is_random_model(self.settings) and "model_source" not in self.settings.overrides:
            keys["model_source"] = self.template(task, keys)
        config = compose_config(keys)
        counts = config.mole.num_experts
        layers = self.model_info.get("layers") or self.layers
        if isinstance(counts, str) and layers is not None and layers < len(counts) and len(set(counts)) == 1:
            keys["mole.num_experts"] = int(counts[0])  # '8888' on fewer than 4 layers: 8 experts everywhere
            config = compose_config(keys)
            self.note_once(f"{spec.name}: mole.num_experts={counts!r} needs >= {len(counts)} layers; "
                           f"{int(counts[0])} experts in each of the {layers} layers instead (the same routing)")
        return config

    def note_once(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            self.log(f"note: {text}")

    def template(self, task: str, keys: dict) -> str:
        """A random model of the run's shape, built once by the library's random loader and saved to the
        work folder (per task kind); every variant loads it (``model_source=<folder>``)."""
        if task in self.templates:
            return self.templates[task]
        s = self.settings
        # The base model only: no mole.* keys (the template is built with method lora, no adapter is used).
        random_keys = {k: v for k, v in keys.items() if k != "model_source" and not k.startswith("mole")}
        random_keys["method"] = "lora"
        if s.model in WIDTH_PRESETS:
            preset = WIDTH_PRESETS[s.model]
            random_keys["model_source"] = f"random:{preset.family}"
            random_keys["random_init"] = {**dict(preset.widths), "num_hidden_layers": self.layers}
        elif self.layers is not None:
            file_init = dict(compose_config(random_keys).backbone.random_init)
            random_keys["random_init"] = {**file_init, "num_hidden_layers": self.layers}
        started = time.perf_counter()
        run = Run(compose_config(random_keys))
        with torch.device(self.device):  # initialised on the GPU when there is one (seconds, not minutes, at 1.7B)
            model = run.base_model()
            if s.model in WIDTH_PRESETS:  # the real embedding size, whatever tokenizer gives the text
                model.resize_token_embeddings(WIDTH_PRESETS[s.model].vocab_size)
        folder = self.work / f"template_{task}"
        model.save_pretrained(folder)
        self.log(f"random {s.model} ({model.config.num_hidden_layers} layers, vocabulary "
                 f"{model.get_input_embeddings().num_embeddings}) built once and saved to the work folder "
                 f"in {time.perf_counter() - started:.1f} s")
        del model
        gc.collect()
        self.templates[task] = str(folder)
        return str(folder)

    # ---- the batch ----------------------------------------------------------------------------------

    def make_batch(self, run: Run, model: nn.Module) -> dict:
        """The run's one batch (built on first use, CPU tensors): CoLA through ``train_collate``, or random ids."""
        if self.batch is not None:
            return self.batch
        s = self.settings
        if s.data == "cola":
            features = run.features(run.examples("train"))
            if len(features) < s.batch:
                raise ValueError(f"--batch {s.batch}: only {len(features)} CoLA training sentences under "
                                 f"{self.data_dir}; lower --batch or point --data-dir at the full data")
            batch = train_collate(features[: s.batch], pad_token_id=run.pad_token_id, task_kind=run.task.task_kind)
        else:
            length = s.seq_len or DEFAULT_SEQ_LEN
            vocab = model.get_input_embeddings().num_embeddings
            pad = run.pad_token_id
            gen = torch.Generator().manual_seed(s.seed)
            ids = torch.randint(0, vocab - 1, (s.batch, length), generator=gen)
            if pad is not None and 0 <= pad < vocab:
                ids = ids + (ids >= pad).long()  # never the pad id (the classifier pools the last non-pad token)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "positions": torch.full((s.batch, 1), length - 1, dtype=torch.long),
                     "targets": torch.randint(0, 2, (s.batch, 1), generator=gen),
                     "example_index": torch.arange(s.batch)}
        self.batch = batch
        return batch

    def batch_on(self, device: torch.device) -> dict:
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.batch.items()}

    def adopt(self, model: nn.Module, device: torch.device) -> nn.Module:
        """A variant's model moved to ``device``, its frozen base weights replaced by the shared ones (unless
        ``--no-share-weights``), and the model's shape recorded (from the first variant)."""
        model.to(device)
        if self.settings.share_weights:
            self.frozen.share(model)
        self.record_model(model)
        return model

    def record_model(self, model: nn.Module) -> None:
        if self.model_info:
            return
        config = getattr(model, "config", None)
        self.model_info = {
            "class": type(model).__name__,
            "layers": getattr(config, "num_hidden_layers", None), "hidden_size": getattr(config, "hidden_size", None),
            "intermediate_size": getattr(config, "intermediate_size", None),
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_key_value_heads": getattr(config, "num_key_value_heads", None),
            "head_dim": getattr(config, "head_dim", None),
            "vocab_size": model.get_input_embeddings().num_embeddings,
        }


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The elements of the model's first ``nn.ModuleList`` of decoder layers (for PEFT, which
    ``compile_mole_model`` does not know)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__.endswith("DecoderLayer"):
            return list(module)
    return []


def library_compile(model: nn.Module, peft: bool = False) -> str:
    """Compiles ``model`` in place as the library does (``ldmole.core.compile.compile_mole_model``: each decoder
    layer, ``use_cache`` off), PEFT's decoder layers the same way with the same options; where the library has
    no compile support, ``nn.Module.compile()`` of the whole model. Returns what was done."""
    try:
        from ..core.compile import COMPILE_OPTIONS, compile_mole_model
    except ImportError:  # a library without compile support
        model.compile()
        return "nn.Module.compile() of the whole model (no ldmole.core.compile)"
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False  # as train() does: a KV cache gives every decoder layer a graph of its own
    if peft:
        blocks = _decoder_blocks(model)
        for block in blocks:
            block.compile(options=dict(COMPILE_OPTIONS))
        return f"{len(blocks)} decoder layers, compile_mole_model's options"
    return f"compile_mole_model: {len(compile_mole_model(model))} decoder layers"


def build_trainer_variant(spec: MethodSpec, ctx: BenchContext) -> Variant:
    """The method through the trainer: its config, accelerator, model, loss terms, controller and ``Trainer``."""
    from .trainer import Trainer, make_accelerator, remole_controller, routing_loss_terms, training_model

    config = ctx.config(spec, f"{spec.name}/trainer")
    controller = remole_controller(config)
    accelerator, config = make_accelerator(config)  # and the config with what the launch decides
    if accelerator.device.type != ctx.device.type:
        raise ValueError(f"--device {ctx.settings.device}: the trainer runs on {accelerator.device} (it uses CUDA "
                         "whenever torch.cuda.is_available()); pass --device auto, or hide the GPUs with "
                         "CUDA_VISIBLE_DEVICES= to measure the CPU")
    run = Run(config)
    base = training_model(config, run)
    compiled = None
    if ctx.settings.compile:
        if _compiled(base):
            compiled = f"trainer: {ctx.compile[0]}={ctx.compile[1]}" if ctx.compile else "trainer"
        else:  # no compile key in this trainer: compiled as the library path is
            compiled = "bench: " + library_compile(base)
    ctx.adopt(base, accelerator.device)
    ctx.make_batch(run, base)
    trainer = Trainer(config, accelerator, run, base, routing_loss_terms(config, controller), controller)
    variant = Variant(spec, "trainer", step=lambda: None, params=list(trainer.trainable),
                      optimizer=trainer.optimizer, model=base)
    variant.compiled = compiled
    batch = ctx.batch_on(accelerator.device)

    def step() -> None:
        trainer.optimizer_step(iter([batch]), 1)
        trainer.state.step += 1

    variant.step = step
    return variant


def with_adapter(model: nn.Module, spec: MethodSpec, config: RunConfig) -> nn.Module:
    """The base ``model`` with the method's adapter: PEFT's LoRA for ``spec.peft``, else ``get_mole_model``."""
    return _peft_model(model, config) if spec.peft else get_mole_model(model, config.mole)


def _peft_model(model: nn.Module, config: RunConfig) -> nn.Module:
    """PEFT LoRA of the method's rank, alpha and dropout on the same target modules; heads in modules_to_save."""
    from peft import LoraConfig, get_peft_model

    from ..core.injection import _matches

    mole = config.mole
    names = [name for name, _ in model.named_modules() if name]
    heads = [h for h in mole.trainable_modules if any(_matches(name, [h]) for name in names)]
    lora = LoraConfig(r=mole.r, lora_alpha=mole.alpha, lora_dropout=mole.dropout, target_modules=mole.target_modules,
                      modules_to_save=heads or None, bias="none")
    return get_peft_model(model, lora)


def build_library_variant(spec: MethodSpec, ctx: BenchContext) -> Variant:
    """The method through the library API alone (or PEFT): base model, adapter, AdamW, losses, a plain loop."""
    config = ctx.config(spec, f"{spec.name}/library")
    run = Run(config)
    model = ctx.adopt(with_adapter(run.base_model(), spec, config), ctx.device)
    model.train()
    ctx.make_batch(run, model)
    params = [p for p in model.parameters() if p.requires_grad] if spec.peft else list(mole_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    variant = Variant(spec, "library", step=lambda: None, params=params, optimizer=optimizer, model=model)
    if ctx.settings.compile:
        variant.compiled = "library: " + library_compile(model, peft=spec.peft)
    settings = config.losses
    router = config.mole.router
    terms = []
    if not spec.peft:
        if settings.lb_coef:
            terms.append(lambda r: settings.lb_coef * losses.load_balance_loss(r, probs=settings.lb_probs))
        if settings.sparsity_coef:
            terms.append(lambda r: settings.sparsity_coef * losses.sparsity_loss(r, k=settings.sparsity_k))
        if settings.z_coef:
            terms.append(lambda r: settings.z_coef * losses.router_z_loss(r))
    controller = None
    if not spec.peft and "l1" in aux_losses_of(router):
        controller = losses.ReMoLEL1Controller(config.mole.top_k, settings.remole_initial_coef, settings.remole_rate,
                                               settings.remole_l1)
    batch = ctx.batch_on(ctx.device)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["targets"][:, 0]
    autocast = ctx.autocast

    def step() -> None:
        with autocast():
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.float(), labels)
        if terms or controller is not None:
            records = routing_records(model)
            for term in terms:
                loss = loss + term(records)
            if controller is not None:
                loss = loss + controller.penalty(records)
                controller.observe(records)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if controller is not None:
            controller.update()

    variant.step = step
    return variant


def _state_bytes(variant: Variant) -> int:
    """Trainable parameters plus the optimiser's state tensors."""
    total = sum(p.numel() * p.element_size() for p in variant.params)
    optimizer = getattr(variant.optimizer, "optimizer", variant.optimizer)  # accelerate's AcceleratedOptimizer
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


# --------------------------------------------------------------------------------------------------
# Measuring.
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (0 when dynamo never ran)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


def run_rounds(variants: list[Variant], warmup: int, steps: int, device: torch.device,
               log: Callable[[str], None]) -> dict[str, list[float]]:
    """Seconds per step of every variant, round-robin (order rotated each round); a variant whose step
    raises keeps its error and leaves the rounds. Graphs that dynamo compiles during a variant's timed
    steps (a recompile after the warm-up) are counted in ``timed_compiles``."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    started = time.perf_counter()
    try:
        for it in range(warmup + steps):
            live = [v for v in variants if v.error is None]
            if not live:
                break
            shift = it % len(live)
            for v in live[shift:] + live[:shift]:
                graphs = _graphs_compiled()
                _sync(device)
                start = time.perf_counter()
                try:
                    v.step()
                    _sync(device)
                except Exception as error:  # reported in the table and the JSON; the others go on
                    v.error = _error_text(error)
                    log(f"  {v.name}: step failed: {v.error}")
                    continue
                if it >= warmup:
                    times[v.name].append(time.perf_counter() - start)
                    v.timed_compiles += _graphs_compiled() - graphs
            gc.collect()
            log(f"  round {it + 1}/{warmup + steps} ({'warm-up' if it < warmup else 'timed'}) done, "
                f"{time.perf_counter() - started:.0f} s")
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def profiled(names: Optional[list], method: str, path: Optional[str] = None) -> bool:
    """Whether ``names`` (``--profile`` or ``--saved``) name this variant (a method alone names all its paths)."""
    return any(name in (method, f"{method}/{path}") for name in names or [])


def saved_tensors(variant: Variant) -> list[dict]:
    """What autograd keeps from one more step's forward for its backward (:func:`bench.saved_storages`: each
    storage once, trainable and frozen parameters left out), under the innermost module running when it was
    first saved (an adapted projection as ``MoLELinear <q_proj>``) and its shape after the first dimension. Rows
    ``{"module", "shape", "mb", "tensors"}``, largest first."""
    from ..core.layer import MoLELinear

    model = variant.model
    stack: list[str] = []
    handles = []
    for module in model.modules():
        label = f"{type(module).__name__} <{module.module_type}>" if isinstance(module, MoLELinear) else \
            type(module).__name__
        handles.append(module.register_forward_pre_hook(lambda _m, _a, label=label: stack.append(label)))
        handles.append(module.register_forward_hook(lambda _m, _a, _o: stack.pop() and None))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    try:
        seen = bench.saved_storages(variant.step, parameters, lambda tensor: (
            stack[-1] if stack else "(outside any module)", tuple(tensor.shape[1:])))
    finally:
        for handle in handles:
            handle.remove()
    totals: dict[tuple[str, tuple], list[int]] = {}
    for nbytes, key in seen.values():
        entry = totals.setdefault(key, [0, 0])
        entry[0] += nbytes
        entry[1] += 1
    rows = [dict(module=module, shape=list(shape), mb=nbytes / 2**20, tensors=count)
            for (module, shape), (nbytes, count) in totals.items()]
    return sorted(rows, key=lambda row: -row["mb"])


def format_saved_tensors(entries: list[dict], rows: int) -> str:
    lines = [f"total {sum(e['mb'] for e in entries):.1f} MB in {sum(e['tensors'] for e in entries)} storages",
             "", "| module | shape after dim 0 | tensors | MB |", "|---|---|---:|---:|"]
    for e in entries[:rows]:
        lines.append(f"| {e['module']} | {tuple(e['shape'])} | {e['tensors']} | {e['mb']:.1f} |")
    if len(entries) > rows:
        lines.append(f"| ({len(entries) - rows} more rows) | | | {sum(e['mb'] for e in entries[rows:]):.1f} |")
    return "\n".join(lines)


def log_profiles(profiles: dict, log: Callable[[str], None], what: str = "step") -> None:
    """Logs each ``--profile`` table (``torch.profiler`` ops by self time of one more ``what``: step or generation)."""
    for name, table in profiles.items():
        log(f"\n### torch.profiler, {name}: one more {what}, ops by self time\n")
        log(table)


def _peak_bytes(variant: Variant, device: torch.device) -> Optional[int]:
    stepper = _Stepper(variant)
    try:
        return bench.cuda_peak_bytes(stepper, device) if device.type == "cuda" else bench.cpu_peak_bytes(stepper)
    except Exception as error:
        variant.error = variant.error or f"memory step: {_error_text(error)}"
        return None


def _rows(variants: list[Variant], times: dict, peaks: dict, tokens: int) -> list[dict]:
    rows = []
    for v in variants:
        t = times[v.name]
        changed = None
        lora_b_moved = None
        if v.fingerprint is not None:
            after = _fingerprint(v.params)
            moved = [not torch.equal(a, b) for a, b in zip(v.fingerprint, after)]
            changed = sum(moved) / max(len(moved), 1)
            names = {id(p): n for n, p in v.model.named_parameters()}
            lora_b = [m for p, m in zip(v.params, moved) if "lora_B" in names.get(id(p), "")]
            lora_b_moved = sum(lora_b) / len(lora_b) if lora_b else None
        median = 1e3 * statistics.median(t) if t else None
        rows.append(dict(
            method=v.spec.name, label=v.spec.label, path=v.path, median_ms=median,
            min_ms=1e3 * min(t) if t else None, times_ms=[1e3 * s for s in t],
            tokens_per_s=tokens / (median / 1e3) if median else None,
            peak_mb=peaks[v.name] / 2**20 if peaks.get(v.name) is not None else None,
            state_mb=_state_bytes(v) / 2**20, trainable_params=sum(p.numel() for p in v.params),
            params_changed=changed, lora_b_moved=lora_b_moved, compile=v.compiled, timed_compiles=v.timed_compiles,
            notes=list(v.notes) + ([f"{v.timed_compiles} graph(s) compiled during timed steps: raise --warmup"]
                                   if v.timed_compiles else []), error=v.error))
    by = {(r["method"], r["path"]): r for r in rows}
    for r in rows:
        ref = by.get((REFERENCE, r["path"]))
        r["ratio_vs_lora_r64"] = (r["median_ms"] / ref["median_ms"]
                                  if ref and ref["median_ms"] and r["median_ms"] else None)
        other = by.get((r["method"], "library")) if r["path"] == "trainer" else None
        r["trainer_over_library"] = (r["median_ms"] / other["median_ms"]
                                     if other and other["median_ms"] and r["median_ms"] else None)
    return rows


def _build_all(settings: StepBenchSettings, ctx: BenchContext) -> list[Variant]:
    variants = []
    for name in settings.method_names():
        spec = method_spec(name)
        for path in settings.paths:
            if spec.peft and path == "trainer":
                continue
            started = time.perf_counter()
            variant = (build_trainer_variant if path == "trainer" else build_library_variant)(spec, ctx)
            variant.fingerprint = _fingerprint(variant.params)
            variants.append(variant)
            ctx.log(f"  built {variant.name} in {time.perf_counter() - started:.1f} s"
                    + (f" ({variant.compiled})" if variant.compiled else ""))
            gc.collect()
    return variants


@contextlib.contextmanager
def quiet_loading():
    """transformers' per-model progress bars (loading, saving) off for the run: dozens of models are built."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # not the load report of every copy (the classifier head is new each time)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def bench_session(settings: StepBenchSettings, log: Callable[[str], None]):
    """What a step or decode benchmark runs inside: its ``BenchContext``, torch's thread count set to
    ``settings.threads``, the recompile limits raised under ``--compile``, and the environment record (versions,
    device, commit); yields ``(ctx, env, limits)`` and restores the thread count and closes the context on exit."""
    threads = torch.get_num_threads()
    ctx = BenchContext(settings, log)
    limits = _raise_recompile_limits() if settings.compile else {}
    try:
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        yield ctx, {**bench.environment(ctx.device, ctx.dtype), **git_state()}, limits
    finally:
        torch.set_num_threads(threads)
        ctx.close()


def _memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return ("peak MB: torch.cuda.max_memory_allocated during one step minus memory_allocated before it "
                "(activations, gradients, temporaries; not the weights or AdamW state that exist before the step)")
    return ("peak MB: peak net bytes from PyTorch's CPU allocator during one step (torch.profiler memory events "
            "replayed; activations, gradients, temporaries; not weights or AdamW state that exist before it; not "
            "what MKL/oneDNN allocate outside PyTorch; not RSS)")


def run_step_benchmark(settings: StepBenchSettings, log: Callable[[str], None] = print) -> dict:
    """Builds every (method, path) variant, times them round-robin, measures memory; returns the JSON-able
    result (``ldmole.cli.bench_step.main`` describes it). Raises ValueError for bad settings."""
    settings = resolved(settings)
    import peft  # noqa: F401 - imported before gc.freeze: it creates many long-lived objects

    with bench_session(settings, log) as (ctx, env, limits):
        _log_header(settings, ctx, env, log)
        log("building the variants:")
        with quiet_loading():
            variants = _build_all(settings, ctx)
        gc.collect()
        gc.freeze()
        try:
            batch = ctx.batch
            tokens = int(batch["attention_mask"].sum())
            if ctx.device.type == "cuda":
                env["cuda_memory_allocated_mb"] = torch.cuda.memory_allocated(ctx.device) / 2**20
            log(f"batch [{batch['input_ids'].shape[0]}, {batch['input_ids'].shape[1]}] ({tokens} real tokens); "
                f"{len(variants)} variants, {settings.warmup} warm-up + {settings.steps} timed rounds:")
            times = run_rounds(variants, settings.warmup, settings.steps, ctx.device, log)
            peaks = {v.name: _peak_bytes(v, ctx.device) if v.error is None else None for v in variants}
            rows = _rows(variants, times, peaks, tokens)
            profiles = {v.name: bench.profile_table(_Stepper(v), ctx.device, settings.profile_rows)
                        for v in variants if v.error is None and profiled(settings.profile, v.spec.name, v.path)}
            saved = {v.name: saved_tensors(v) for v in variants
                     if v.error is None and profiled(settings.saved, v.spec.name, v.path)}
        finally:
            gc.unfreeze()
        if hasattr(os, "getloadavg"):
            env["loadavg_end"] = list(os.getloadavg())
        setting = dict(
            model=settings.model, model_info=ctx.model_info, layers=ctx.model_info.get("layers"),
            device=str(ctx.device), dtype=ctx.dtype_name, compile=settings.compile,
            compile_key=list(ctx.compile) if ctx.compile else None, recompile_limits=limits, data=settings.data,
            data_dir=str(ctx.data_dir), tokenizer=ctx.tokenizer(), batch=settings.batch,
            seq_len=int(batch["input_ids"].shape[1]), tokens=tokens, methods=settings.method_names(),
            paths=list(settings.paths), steps=settings.steps, warmup=settings.warmup, seed=settings.seed,
            share_weights=settings.share_weights, overrides={k: str(v) for k, v in settings.overrides.items()},
            task=TASK)
        memory = dict(peak_mb=_memory_note(ctx.device),
                      state_mb="trainable parameters + AdamW state of the variant (counted from the tensors)",
                      shared_frozen_mb=ctx.frozen.total_bytes() / 2**20,
                      frozen_bytes_deduplicated_mb=ctx.frozen.shared_bytes / 2**20)
        result = dict(environment=env, setting=setting, reference=REFERENCE, memory=memory, rows=rows,
                      profiles=profiles, saved_tensors=saved)
        log("")
        log(format_table(result))
        log_profiles(profiles, log)
        for name, entries in saved.items():
            log(f"\n### saved for the backward, {name}\n")
            log(format_saved_tensors(entries, settings.profile_rows))
        failed = [r for r in rows if r["error"]]
        if failed:
            log(f"\n{len(failed)} variant(s) failed: " + "; ".join(f"{r['method']}/{r['path']}: {r['error']}"
                                                                   for r in failed))
        return result


def _log_header(settings: StepBenchSettings, ctx: BenchContext, env: dict, log: Callable[[str], None]) -> None:
    log("# Whole training steps (forward, routing losses, backward, AdamW step)")
    log("")
    commit = env.get("commit") or "unknown"
    log(f"commit {commit}" + (" (working tree had uncommitted changes)" if env.get("dirty") else "")
        + f"; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}")
    log(f"device {env['device']}" + (f" ({env['gpu']})" if "gpu" in env else f" ({env.get('cpu', '')})")
        + f", dtype {ctx.dtype_name}" + (" (autocast; adapters float32)" if ctx.dtype != torch.float32 else "")
        + f", torch threads {env['torch_num_threads']}, os.cpu_count() {env['cpu_count']}")
    log(f"model {settings.model}" + (f", {ctx.layers} layers" if ctx.layers else "") + f", task {TASK}, data "
        f"{settings.data}" + (f" (seq len {settings.seq_len or DEFAULT_SEQ_LEN})" if settings.data == "random" else "")
        + f", batch {settings.batch}; compile {'on' if settings.compile else 'off'}"
        + (f" (config key {ctx.compile[0]}={ctx.compile[1]})" if ctx.compile else
           (" (no OptimConfig compile key: the bench compiles both paths as the library does)"
            if settings.compile else "")))
    if settings.overrides:
        log("overrides: " + " ".join(f"{k}={v}" for k, v in settings.overrides.items()))


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def format_table(result: dict) -> str:
    """The markdown table of a :func:`run_step_benchmark` result."""
    setting = result["setting"]
    info = setting.get("model_info") or {}
    lines = [f"## {setting['model']}: {info.get('layers')} layers, hidden {info.get('hidden_size')}, batch "
             f"[{setting['batch']}, {setting['seq_len']}] ({setting['tokens']} real tokens), {setting['device']} "
             f"{setting['dtype']}, compile {'on' if setting['compile'] else 'off'}, median of {setting['steps']} "
             f"after {setting['warmup']} warm-up",
             "",
             "| method | path | ms/step | min ms | tokens/s | ÷ lora r64 (ours) | trainer ÷ library | peak MB "
             "| state MB | trainable M | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        note = "; ".join(filter(None, [r["error"] and f"FAILED: {r['error']}", r.get("compile") or "",
                                       *r.get("notes", [])]))
        lines.append(f"| {r['label']} | {r['path']} | {_fmt(r['median_ms'], '.1f')} | {_fmt(r['min_ms'], '.1f')} "
                     f"| {_fmt(r['tokens_per_s'], '.0f')} | {_fmt(r['ratio_vs_lora_r64'], '.2f')} "
                     f"| {_fmt(r['trainer_over_library'], '.2f')} | {_fmt(r['peak_mb'], '.0f')} "
                     f"| {_fmt(r['state_mb'], '.1f')} | {r['trainable_params'] / 1e6:.2f} | {note} |")
    lines += ["", result["memory"]["peak_mb"] + "; state MB: " + result["memory"]["state_mb"]
              + f"; frozen base held once: {result['memory']['shared_frozen_mb']:.0f} MB"]
    return "\n".join(lines)
