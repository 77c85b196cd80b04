"""Forward+backward time and peak memory of one ``MoLELinear`` against two baselines (``ldmole-bench-layer``).

Variants, for every projection shape d_in x d_out (all share one frozen base ``nn.Linear``):

- ``ldmole <router>``: ``ldmole.MoLELinear`` with router sparsegen (its own ``ldmole.LambdaMLP(d_in,
  lambda_hidden)``, live initialisation so that λ varies per token), sparsegen_fixed (λ = fixed_lambda),
  topk (k = top_k), relu, softmax.
- ``ldmole lora (rank E·r)``: ``MoLELinear`` with ``MoLEConfig(router="lora", num_experts=1, r=E·r)``.
- ``dense-einsum <router>``: :class:`ldmole.core.dense_reference.DenseEinsumMoLE`, the reference release's
  formulation: A [E, r, d_in] and B [E, d_out, r] stacked, dropout(x) expanded to [B, S, E, d_in],
  ``einsum("bsni,nir->bsnr")``, ``einsum("bsnr,nro->bsno")`` (a [B, S, E, d_out] tensor), then
  ``einsum("bsno,bsn->bso")`` with the routing weights. It routes through the same router class (its
  own weights and λ-MLP), so only the expert computation differs from the ldmole variant.
- ``peft lora (rank E·r)``: a PEFT ``lora.Linear`` made by ``peft.get_peft_model`` on a one-Linear
  module with ``LoraConfig(r=E·r, lora_alpha=2·E·r, target_modules=["proj"])``; the injected
  ``lora.Linear`` is called directly (no ``PeftModel`` wrapper), like the other layers.
- ``base linear only``: the frozen ``nn.Linear`` alone (no adapter), to read the adapters' own cost.

Protocol: input x [1, T, d_in] with requires_grad=True (as inside a network); frozen base, trainable
adapter parameters (λ-MLP included for sparsegen); LoRA dropout (0.1 by default) in train mode for
every adapter variant; one step = forward, then backward of ``sum(out * g)`` with a fixed random g
(``loss="grad"``, default) or of ``out.float().pow(2).mean()`` (``loss="square"``); gradients are set
to None before every step (not timed). Variants run interleaved (one step of each variant per round)
so that load from other processes hits all of them alike. Time = median over ``iters`` rounds (after
``warmup`` rounds) of the wall time of one step, with ``torch.cuda.synchronize`` before and after on
CUDA. With ``dtype="bfloat16"`` the base weight and x are bfloat16, the adapter parameters stay
float32 and the step runs under ``torch.autocast(bfloat16)``.

Memory (one extra step per variant, after timing, gradients None beforehand):

- ``peak MB`` on CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the start.
- ``peak MB`` on CPU: the peak of the net bytes held by blocks that the CPU allocator (c10
  DefaultCPUAllocator) handed out during the step: every allocation and free reported to
  ``torch.profiler.profile(profile_memory=True)`` is replayed in time order and the running sum's
  maximum is taken. It counts every tensor allocated during the step (activations, temporaries,
  autograd buffers, output, gradients of x and of the adapter parameters), not the parameters or x
  that exist before it; it does not see memory that MKL/oneDNN allocate internally outside the
  PyTorch allocator. Same definition as the CUDA number.
- ``saved MB`` (both devices): the distinct storages that autograd saved for backward during the
  forward (``torch.autograd.graph.saved_tensors_hooks``), excluding those of parameters and x.

This module only measures. That ``MoLELinear`` computes the same adapter outputs and gradients as
the dense-einsum formulation (and, for router lora, as PEFT) is checked by the tests
(tests/unit/test_dense_reference.py), for every router.

The goal ratios on 2048x6144 (:func:`compute_goals`): ldmole vs dense-einsum speed-up >= 3x, ldmole
time / PEFT LoRA time <= 1.5x, for sparsegen and softmax, with the adapter-only ratios (time minus
the base-only time) and the ceiling dense-einsum time / base-only time for context.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

import ldmole

from ..core.config import MoLEConfig
from ..core.dense_reference import DenseEinsumMoLE
from ..core.lambda_mlp import LambdaMLP
from ..core.layer import MoLELinear
from ..core.routers import BUILTIN_ROUTERS, LORA, get_router, validate_mole_config

__all__ = ["BenchSettings", "Variant", "run_benchmark", "check_settings", "parse_shapes", "mole_config",
           "build_ldmole", "build_dense", "build_peft", "build_variants", "make_base", "compute_goals",
           "format_table", "ROUTERS", "DEFAULT_SHAPES", "BASE_VARIANT", "PEFT_VARIANT", "LDMOLE_LORA_VARIANT"]

ROUTERS = (*BUILTIN_ROUTERS, LORA)
DEFAULT_SHAPES = "2048x2048,2048x6144,6144x2048"  # Qwen3-1.7B: q/o, gate/up, down
GOAL_SHAPE = (2048, 6144)
GOAL_SETTING = dict(tokens=512, experts=8, rank=8)
SPEEDUP_GOAL = 3.0
PEFT_RATIO_GOAL = 1.5
BASE_VARIANT = "base linear only"
PEFT_VARIANT = "peft lora (rank E·r)"
LDMOLE_LORA_VARIANT = "ldmole lora (rank E·r)"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'2048x2048,2048x6144' -> [(2048, 2048), (2048, 6144)]; ValueError naming a malformed item."""
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            d_in, d_out = (int(v) for v in item.split("x"))
        except ValueError:
            raise ValueError(f"shape {item!r} is not D_INxD_OUT (e.g. 2048x6144)") from None
        shapes.append((d_in, d_out))
    if not shapes:
        raise ValueError("no shapes given")
    return shapes


@dataclass
class BenchSettings:
    """What one benchmark run measures (the ``ldmole-bench-layer`` options, same names and defaults)."""

    shapes: list = field(default_factory=lambda: parse_shapes(DEFAULT_SHAPES))
    tokens: int = 512
    experts: int = 8
    rank: int = 8
    iters: int = 10
    warmup: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    threads: Optional[int] = None
    routers: list = field(default_factory=lambda: list(ROUTERS))
    alpha: float = 16.0
    dropout: float = 0.1
    lambda_hidden: int = 256
    fixed_lambda: Optional[float] = None  # None: the reference release's untrained constant (-1.589)
    top_k: int = 2
    loss: str = "grad"
    seed: int = 0
    profile: Optional[str] = None
    profile_rows: int = 15


# --------------------------------------------------------------------------------------------------
# Building the variants.
# --------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One benchmarked layer: its module and its trainable parameters."""

    name: str
    family: str  # "ldmole" | "dense-einsum" | "peft" | "base"
    router: Optional[str]
    module: nn.Module
    params: list = field(default_factory=list)


def make_base(d_in: int, d_out: int, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    """The frozen base projection (weights in the benchmark dtype, bias-free as in Qwen3/Llama)."""
    base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    return base


def _trainable(*modules: Optional[nn.Module]) -> list:
    seen, params = set(), []
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def ldmole_name(router: str) -> str:
    return LDMOLE_LORA_VARIANT if router == LORA else f"ldmole {router}"


def dense_name(router: str) -> str:
    return f"dense-einsum {router}"


def _learned_lambda(router: str) -> bool:
    """Whether ``router`` reads a λ-MLP (each variant gets its own)."""
    return router != LORA and get_router(router).learned_lambda


def make_lambda_mlp(d_in: int, settings: BenchSettings, device: torch.device) -> LambdaMLP:
    """``LambdaMLP(d_in, lambda_hidden)`` with the default live initialisation (λ varies per token)."""
    return LambdaMLP(d_in, settings.lambda_hidden).to(device)


def mole_config(router: str, settings: BenchSettings) -> MoLEConfig:
    """The ``MoLEConfig`` of a variant: E experts of rank r, or for lora one expert of rank E·r (alpha E·alpha)."""
    if router == LORA:
        return MoLEConfig(router=LORA, num_experts=1, r=settings.experts * settings.rank,
                          alpha=settings.alpha * settings.experts, dropout=settings.dropout)
    return MoLEConfig(router=router, num_experts=settings.experts, r=settings.rank, alpha=settings.alpha,
                      dropout=settings.dropout, top_k=settings.top_k, fixed_lambda=settings.fixed_lambda,
                      lambda_hidden=settings.lambda_hidden)


def _nonzero_b(layer: nn.Module) -> None:
    """B_e kaiming-uniform(a=√5), as after some training (a zero B would skip part of the backward)."""
    with torch.no_grad():
        for e in range(layer.num_experts):
            nn.init.kaiming_uniform_(layer.lora_B[e], a=math.sqrt(5))


def make_mole(base: nn.Linear, router: str, settings: BenchSettings, layer_class: type = MoLELinear) -> nn.Module:
    """``layer_class`` (``MoLELinear`` or ``DenseEinsumMoLE``) for ``router`` with its own λ-MLP (sparsegen);
    B non-zero, as after some training."""
    lambda_mlp = make_lambda_mlp(base.in_features, settings, base.weight.device) if _learned_lambda(router) else None
    config = mole_config(router, settings)
    layer = layer_class(base, config, num_experts=config.num_experts, lambda_mlp=lambda_mlp)
    _nonzero_b(layer)
    base.weight.requires_grad_(False)
    return layer


def build_ldmole(base: nn.Linear, router: str, settings: BenchSettings) -> Variant:
    """The ``ldmole <router>`` variant."""
    layer = make_mole(base, router, settings)
    return Variant(ldmole_name(router), "ldmole", router, layer, _trainable(layer, layer.lambda_mlp))


def build_dense(base: nn.Linear, router: str, settings: BenchSettings) -> Variant:
    """The ``dense-einsum <router>`` variant: :class:`DenseEinsumMoLE` with its own router and λ-MLP."""
    layer = make_mole(base, router, settings, layer_class=DenseEinsumMoLE)
    return Variant(dense_name(router), "dense-einsum", router, layer, _trainable(layer, layer.lambda_mlp))


def build_peft(base: nn.Linear, settings: BenchSettings) -> Variant:
    """PEFT LoRA of rank E·r (alpha 2·E·r) on the base, via ``get_peft_model``; B made non-zero."""
    from peft import LoraConfig, get_peft_model

    rank = settings.experts * settings.rank
    config = LoraConfig(r=rank, lora_alpha=settings.alpha * settings.experts, lora_dropout=settings.dropout,
                        target_modules=["proj"], bias="none")
    model = get_peft_model(nn.Sequential(OrderedDict(proj=base)), config)  # one Linear named proj
    layer = model.base_model.model.proj  # the injected peft lora.Linear
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.lora_B["default"].weight, a=math.sqrt(5))
    base.weight.requires_grad_(False)
    layer._bench_peft_model = [model]  # keep the PeftModel alive, unregistered
    return Variant(PEFT_VARIANT, "peft", "lora", layer, _trainable(layer))


def build_base_only(base: nn.Linear) -> Variant:
    return Variant(BASE_VARIANT, "base", None, base, [])


# --------------------------------------------------------------------------------------------------
# Measuring.
# --------------------------------------------------------------------------------------------------


class Stepper:
    """One timed step of one variant: forward, backward; gradients reset (untimed) beforehand."""

    def __init__(self, variant: Variant, x: torch.Tensor, grad_out: torch.Tensor, loss: str, autocast: Callable):
        self.variant, self.x, self.grad_out, self.loss, self.autocast = variant, x, grad_out, loss, autocast

    def zero(self) -> None:
        for p in self.variant.params:
            p.grad = None
        self.x.grad = None

    def __call__(self) -> None:
        with self.autocast():
            out = self.variant.module(self.x)
        if self.loss == "square":
            out.float().pow(2).mean().backward()
        else:
            grad = self.grad_out if self.grad_out.dtype == out.dtype else self.grad_out.to(out.dtype)
            out.backward(grad)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(steppers: list[Stepper], warmup: int, iters: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of every variant, run interleaved: each round steps every variant once.

    The order inside a round is rotated every round so no variant always follows the same one.
    """
    times: dict[str, list[float]] = {s.variant.name: [] for s in steppers}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for it in range(warmup + iters):
            shift = it % len(steppers)
            for step in steppers[shift:] + steppers[:shift]:
                step.zero()
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                elapsed = time.perf_counter() - start
                if it >= warmup:
                    times[step.variant.name].append(elapsed)
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
        for step in steppers:
            step.zero()
    return times


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the profiler's own start/stop lines (written to fd 2 by its C++ side)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(step: Stepper) -> int:
    """Peak net bytes from the CPU allocator during one step (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    step.zero()
    gc.collect()
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    if not events:
        raise RuntimeError("the profiler reported no CPU memory events; cannot measure the CPU peak")
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    step.zero()
    return peak


def cuda_peak_bytes(step: Stepper, device: torch.device) -> int:
    """``max_memory_allocated`` during one step minus ``memory_allocated`` before it."""
    step.zero()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - start
    step.zero()
    return peak


def profile_table(step: Stepper, device: torch.device, rows: int) -> str:
    """``torch.profiler`` op table (self time) of one step, after one unprofiled step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step.zero()
    step()
    step.zero()
    _sync(device)
    with _quiet_stderr():
        with profile(activities=activities) as prof:
            step()
            _sync(device)
    step.zero()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def saved_storages(forward: Callable[[], Any], exclude: set[int],
                   describe: Callable[[torch.Tensor], Any] = lambda tensor: None) -> dict[int, tuple[int, Any]]:
    """What autograd saves for the backward while ``forward()`` runs: each distinct storage once (by its data
    pointer, ``exclude`` left out: parameters, inputs) as ``{pointer: (bytes, describe(first tensor saved))}``."""
    seen: dict[int, tuple[int, Any]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in exclude and pointer not in seen and storage.nbytes() > 0:
            seen[pointer] = (storage.nbytes(), describe(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return seen


def saved_bytes(step: Stepper) -> int:
    """Bytes of the distinct storages saved for backward in one forward, parameters and x excluded."""
    pre_existing = {t.untyped_storage().data_ptr() for t in step.variant.module.parameters()}
    pre_existing |= {p.untyped_storage().data_ptr() for p in step.variant.params}
    pre_existing.add(step.x.untyped_storage().data_ptr())

    def forward() -> None:
        with step.autocast():
            step.variant.module(step.x)

    step.zero()
    seen = saved_storages(forward, pre_existing)
    step.zero()
    return sum(nbytes for nbytes, _ in seen.values())


def resolve_device(text: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ValueError for a device that cannot run here."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch.cuda.is_available() is False")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {text!r}; use cpu, cuda or auto")
    return device


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ldmole": getattr(ldmole, "__version__", "workspace"),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    for pkg in ("peft", "transformers"):
        try:
            info[pkg] = importlib.metadata.version(pkg)  # no import: transformers takes seconds to import
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        info["cpu"] = platform.processor()
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run_benchmark(settings: BenchSettings, log: Callable[[str], None] = print) -> dict:
    """Runs every shape; returns the JSON-able result (``ldmole.cli.bench_layer.main`` describes it).

    ``threads`` is undone at the end. The objects alive at the start are frozen out of the garbage
    collector (``gc.freeze``) for the run, so the ``gc.collect()`` calls between measurements are
    cheap; they are unfrozen at the end.
    """
    import peft  # noqa: F401 - imported before the freeze: it creates many long-lived objects

    threads = torch.get_num_threads()
    gc.collect()
    gc.freeze()
    try:
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        return _run_benchmark(settings, log)
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)  # threads is for this run only (the CLI may be called in-process)


def check_settings(settings: BenchSettings) -> None:
    """Raises ValueError (naming the option) on a setting that cannot run."""
    for name in ("tokens", "experts", "rank", "iters", "lambda_hidden", "top_k"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if settings.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    if "topk" in settings.routers and settings.top_k > settings.experts:
        raise ValueError(f"--top-k {settings.top_k} exceeds --experts {settings.experts}")
    unknown = [r for r in settings.routers if r not in ROUTERS]
    if unknown or not settings.routers:
        raise ValueError(f"unknown routers {unknown}; choose from {','.join(ROUTERS)}")
    for router in settings.routers:
        validate_mole_config(mole_config(router, settings))
    resolve_device(settings.device)


def _log_setting(env: dict, settings: BenchSettings, dtype: torch.dtype, log: Callable[[str], None]) -> None:
    """Prints the header: versions, device, the protocol and what the memory columns mean."""
    log("# MoLELinear layer benchmark (forward + backward)")
    log("")
    log(f"torch {env['torch']}, peft {env['peft']}, transformers {env['transformers']}, python {env['python']}")
    log(f"device {env['device']}" + (f" ({env['gpu']})" if "gpu" in env else f" ({env.get('cpu', '')})")
        + f", dtype {env['dtype']}" + (" (autocast; adapters float32)" if dtype != torch.float32 else "")
        + f", torch.get_num_threads() = {env['torch_num_threads']} (interop {env['torch_num_interop_threads']}),"
          f" os.cpu_count() = {env['cpu_count']}")
    log(f"x [1, {settings.tokens}, d_in] requires_grad; E = {settings.experts}, r = {settings.rank}, "
        f"alpha = {settings.alpha:g}, LoRA rank E·r = {settings.experts * settings.rank}; "
        f"dropout {settings.dropout:g} (train mode, every adapter); "
        f"λ-MLP hidden {settings.lambda_hidden}; fixed λ "
        f"{'released constant' if settings.fixed_lambda is None else format(settings.fixed_lambda, 'g')}; "
        f"top-k {settings.top_k}; "
        f"loss {'sum(out * g)' if settings.loss == 'grad' else 'out.float().pow(2).mean()'}; "
        f"median of {settings.iters} interleaved rounds after {settings.warmup} warm-up")
    log("peak MB: " + ("torch.cuda.max_memory_allocated delta over one step" if env["device"].startswith("cuda") else
                       "peak net bytes allocated by the CPU allocator during one step (torch.profiler memory events)")
        + "; saved MB: storages saved for backward (parameters and x excluded)")


def build_variants(base: nn.Linear, settings: BenchSettings) -> list[Variant]:
    """Base only, then ldmole and dense-einsum for every router (ldmole only for lora), then PEFT."""
    variants = [build_base_only(base)]
    for router in settings.routers:
        variants.append(build_ldmole(base, router, settings))
        if router != LORA:
            variants.append(build_dense(base, router, settings))
    variants.append(build_peft(base, settings))
    return variants


def _measure_rows(steppers: list[Stepper], times: dict[str, list[float]], device: torch.device) -> list[dict]:
    """One result row per variant: times, peak and saved memory, trainable parameters, and the ratios."""
    rows = []
    for step in steppers:
        v, t = step.variant, times[step.variant.name]
        peak = cuda_peak_bytes(step, device) if device.type == "cuda" else cpu_peak_bytes(step)
        rows.append(dict(variant=v.name, family=v.family, router=v.router,
                         median_ms=1e3 * statistics.median(t), min_ms=1e3 * min(t),
                         times_ms=[1e3 * s for s in t], peak_mb=peak / 2**20, saved_mb=saved_bytes(step) / 2**20,
                         trainable_params=sum(p.numel() for p in v.params)))
    row_by = {r["variant"]: r for r in rows}
    base_ms, peft_ms = row_by[BASE_VARIANT]["median_ms"], row_by[PEFT_VARIANT]["median_ms"]
    for r in rows:
        r["adapter_ms"] = r["median_ms"] - base_ms
        r["ratio_vs_peft"] = r["median_ms"] / peft_ms
        r["speedup_vs_dense"] = None
        if r["family"] == "ldmole" and dense_name(r["router"]) in row_by:
            r["speedup_vs_dense"] = row_by[dense_name(r["router"])]["median_ms"] / r["median_ms"]
    return rows


def bench_shape(d_in: int, d_out: int, settings: BenchSettings, device: torch.device, dtype: torch.dtype,
                autocast: Callable, log: Callable[[str], None]) -> dict:
    """Times and measures every variant on one projection shape; logs its table (and --profile)."""
    torch.manual_seed(settings.seed)
    base = make_base(d_in, d_out, device, dtype)
    variants = build_variants(base, settings)
    x = torch.randn(1, settings.tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed + 1)
    grad_out = torch.randn(1, settings.tokens, d_out, generator=gen).to(device=device, dtype=dtype)
    for v in variants:
        v.module.train()
    steppers = [Stepper(v, x, grad_out, settings.loss, autocast) for v in variants]
    rows = _measure_rows(steppers, time_variants(steppers, settings.warmup, settings.iters, device), device)
    if settings.profile:
        wanted = {n.strip() for n in settings.profile.split(",")}
        for step in steppers:
            if "all" in wanted or step.variant.name in wanted:
                log(f"\n### torch.profiler, one step of {step.variant.name} ({d_in}x{d_out}), by self CPU time\n")
                log(profile_table(step, device, settings.profile_rows))
    shape_out = dict(d_in=d_in, d_out=d_out, shape=f"{d_in}x{d_out}", rows=rows)
    log("")
    log(format_table(shape_out, settings))
    return shape_out


def _run_benchmark(settings: BenchSettings, log: Callable[[str], None]) -> dict:
    """Checks the arguments, runs every shape, then logs the load average and the goal ratios."""
    check_settings(settings)
    device = resolve_device(settings.device)
    dtype = torch.bfloat16 if settings.dtype == "bfloat16" else torch.float32

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    env = environment(device, dtype)
    setting = dict(tokens=settings.tokens, experts=settings.experts, rank=settings.rank, iters=settings.iters,
                   warmup=settings.warmup, alpha=settings.alpha, dropout=settings.dropout,
                   lambda_hidden=settings.lambda_hidden, fixed_lambda=settings.fixed_lambda, top_k=settings.top_k,
                   loss=settings.loss, seed=settings.seed, routers=list(settings.routers),
                   shapes=[f"{i}x{o}" for i, o in settings.shapes])
    _log_setting(env, settings, dtype, log)
    shapes_out = []
    for d_in, d_out in settings.shapes:
        shapes_out.append(bench_shape(d_in, d_out, settings, device, dtype, autocast, log))
        gc.collect()  # the shape's layers are garbage now; free them before the next shape is timed
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = list(os.getloadavg())
        log(f"\nload average (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in env['loadavg_start'])} at the start, "
            f"{', '.join(f'{v:.2f}' for v in env['loadavg_end'])} at the end (other processes share the CPU)")
    goals = compute_goals(shapes_out, settings)
    if goals["lines"]:
        log("")
        log("## Goal ratios")
        log("")
        for line in goals["lines"]:
            log(line)
    return dict(environment=env, setting=setting, shapes=shapes_out, goals=goals["values"])


def format_table(shape_out: dict, settings: BenchSettings) -> str:
    lines = [f"## {shape_out['d_in']} -> {shape_out['d_out']}, T = {settings.tokens}, E = {settings.experts}, "
             f"r = {settings.rank}",
             "",
             "| variant | median ms | min ms | adapter ms (- base) | time / PEFT LoRA "
             "| ldmole speed-up vs dense-einsum | peak MB | saved MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in shape_out["rows"]:
        speedup = f"{r['speedup_vs_dense']:.2f}x" if r["speedup_vs_dense"] is not None else ""
        adapter = f"{r['adapter_ms']:.1f}" if r["family"] != "base" else ""
        lines.append(f"| {r['variant']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {adapter} "
                     f"| {r['ratio_vs_peft']:.2f} | {speedup} | {r['peak_mb']:.1f} | {r['saved_mb']:.1f} |")
    return "\n".join(lines)


def _fmt_ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def compute_goals(shapes_out: list[dict], settings: BenchSettings) -> dict:
    """The goal ratios on 2048 -> 6144 (T = 512, E = 8, r = 8 are the setting they are defined for)."""
    shape = next((s for s in shapes_out if (s["d_in"], s["d_out"]) == GOAL_SHAPE), None)
    values, lines = {}, []
    if shape is None:
        return dict(values=values, lines=[f"(goal ratios need shape {GOAL_SHAPE[0]}x{GOAL_SHAPE[1]}; not run)"])
    setting = dict(tokens=settings.tokens, experts=settings.experts, rank=settings.rank)
    note = "" if setting == GOAL_SETTING else (f" [measured at T={settings.tokens}, E={settings.experts}, "
                                                f"r={settings.rank}; the goals are for T=512, E=8, r=8]")
    row_by = {r["variant"]: r for r in shape["rows"]}
    peft_ms = row_by[PEFT_VARIANT]["median_ms"]
    base_ms = row_by[BASE_VARIANT]["median_ms"]
    rank = settings.experts * settings.rank
    for router in ("sparsegen", "softmax"):
        ld, dense = row_by.get(ldmole_name(router)), row_by.get(dense_name(router))
        if ld is None or dense is None:
            continue
        speedup = dense["median_ms"] / ld["median_ms"]
        ratio = ld["median_ms"] / peft_ms
        peft_adapter_ms = row_by[PEFT_VARIANT]["adapter_ms"]
        values[router] = dict(
            speedup_vs_dense=speedup, speedup_goal=SPEEDUP_GOAL, speedup_met=speedup >= SPEEDUP_GOAL,
            ratio_vs_peft=ratio, ratio_goal=PEFT_RATIO_GOAL, ratio_met=ratio <= PEFT_RATIO_GOAL,
            adapter_speedup_vs_dense=dense["adapter_ms"] / ld["adapter_ms"] if ld["adapter_ms"] > 0 else None,
            adapter_ratio_vs_peft=ld["adapter_ms"] / peft_adapter_ms if peft_adapter_ms > 0 else None)
        speedup_verdict = "MET" if speedup >= SPEEDUP_GOAL else "NOT MET"
        ratio_verdict = "MET" if ratio <= PEFT_RATIO_GOAL else "NOT MET"
        lines.append(f"- {GOAL_SHAPE[0]}x{GOAL_SHAPE[1]}: ldmole {router} vs dense-einsum {router} speed-up "
                     f"(goal >= {SPEEDUP_GOAL:g}x): {speedup:.2f}x -> {speedup_verdict}{note}")
        lines.append(f"- {GOAL_SHAPE[0]}x{GOAL_SHAPE[1]}: ldmole {router} time / PEFT LoRA rank-{rank} time "
                     f"(goal <= {PEFT_RATIO_GOAL:g}x): {ratio:.2f}x -> {ratio_verdict}{note}")
        ceiling = dense["median_ms"] / base_ms
        adapter = values[router]
        lines.append(f"  context: adapter-only (time - base linear) ldmole {router} speed-up vs dense-einsum "
                     f"{_fmt_ratio(adapter['adapter_speedup_vs_dense'])}, adapter-only ratio vs PEFT "
                     f"{_fmt_ratio(adapter['adapter_ratio_vs_peft'])}; ceiling of the whole-layer speed-up on this "
                     f"machine (dense-einsum {router} time / base-linear-only time, i.e. a free adapter) "
                     f"{ceiling:.2f}x")
        adapter["speedup_ceiling"] = ceiling
    return dict(values=values, lines=lines)

