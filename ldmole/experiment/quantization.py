"""Quantised base models (QLoRA): the frozen base in 4-bit (NF4, FP4) or 8-bit (LLM.int8) through
bitsandbytes, the MoLE adapters and trained heads in float32 on top.

``quantization=nf4|fp4|int8`` (``BackboneConfig.quantization``; default ``none``) makes
:func:`ldmole.experiment.models.load_base_model` load the base through transformers'
``BitsAndBytesConfig`` (compute dtype ``torch_dtype``; 4-bit with double quantisation of the block
scales, as QLoRA) and then :func:`prepare_kbit_model` it. bitsandbytes' quantised layers
(``Linear4bit``, ``Linear8bitLt``) are ``nn.Linear`` subclasses, so ``get_mole_model`` wraps them as
it wraps any linear layer: ``base_layer(x)`` dequantises on the fly; only the adapters train.

bitsandbytes is the optional extra ``qlora`` (``pip install -e '.[qlora]'``); without it a quantised
setting fails with :class:`MissingExtraError`, naming the extra. docs/quantization.md says what is
supported where, and has the memory numbers.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["QUANTIZATIONS", "QLORA_EXTRA", "MissingExtraError", "require_bitsandbytes", "bitsandbytes_config",
           "quantized_device_map", "check_quantization_setup", "load_quantized", "quantize_built_model",
           "prepare_kbit_model", "quantization_of", "model_card_note", "quantized_linear_names",
           "base_weight_bytes", "loaded_weight_bytes", "llama31_8b_config", "llama31_8b_weight_memory"]

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")  # the values BackboneConfig.quantization may take
QLORA_EXTRA = "pip install -e '.[qlora]'"
BLOCKSIZE_4BIT = 64  # bitsandbytes' 4-bit block size (one scale per 64 weights)
BLOCKSIZE_NESTED = 256  # double quantisation: one float32 scale per 256 8-bit block scales
_INT8_CAST_NOTICE = "MatMul8bitLt: inputs will be cast"


class MissingExtraError(ImportError, ValueError):
    """A setting needs an optional extra that is not installed. An ``ImportError`` (a package is missing)
    that the commands report as the bad setting it is (a ``ValueError``: one ``error: ...`` line, no traceback)."""


def require_bitsandbytes(quantization: str, key: str = "quantization") -> Any:
    """The ``bitsandbytes`` module for ``key=quantization``.

    Raises:
        MissingExtraError: bitsandbytes is not installed (naming the extra and ``quantization=none``).
    """
    try:
        import bitsandbytes
    except ImportError as error:
        raise MissingExtraError(
            f"{key}={quantization} loads the base model through bitsandbytes, which is not installed ({error}); "
            f"install the optional extra: {QLORA_EXTRA} (pip install 'bitsandbytes>=0.50'), or load the base in "
            f"full precision with {key}=none") from None
    _quiet_int8_cast_notice()
    return bitsandbytes


class _DropInt8CastNotice(logging.Filter):
    """LLM.int8 quantises every input through float16 and bitsandbytes logs that at each call of each layer
    (hundreds of lines per step); it is expected and documented, so the line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_INT8_CAST_NOTICE)


def _quiet_int8_cast_notice() -> None:
    """Installs :class:`_DropInt8CastNotice` on bitsandbytes' autograd logger, once."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNotice) for f in logger.filters):
        logger.addFilter(_DropInt8CastNotice())


def bitsandbytes_config(quantization: str, dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` of ``quantization``: 4-bit NF4 / FP4 computing in ``dtype``
    with double quantisation (QLoRA's recipe), or 8-bit LLM.int8 (which computes through float16).

    Raises:
        ValueError: ``quantization`` is not one of :data:`QUANTIZATIONS` other than none.
        MissingExtraError: bitsandbytes is not installed.
    """
    if quantization not in QUANTIZATIONS[1:]:
        raise ValueError(f"quantization={quantization!r} is not a bitsandbytes quantisation; choose one of "
                         f"{QUANTIZATIONS[1:]} (or none)")
    require_bitsandbytes(quantization)
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True)


def quantized_device_map() -> dict[str, Any]:
    """Where a quantised base is loaded (bitsandbytes quantises while loading, on the final device): this
    process's CUDA device (``torch.cuda.current_device()``, which accelerate sets per process), else the CPU."""
    return {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}


def check_quantization_setup(quantization: str, distributed_type: Any = None) -> None:
    """Refuses, before anything loads, a quantised run that cannot work: bitsandbytes missing, or a
    sharded launch (FSDP, DeepSpeed), whose flattening of the base's parameters ldmole does not support
    for bitsandbytes' packed 4-bit / 8-bit weights.

    Raises:
        MissingExtraError: bitsandbytes is not installed.
        ValueError: FSDP or DeepSpeed with a quantised base (naming both ways out).
    """
    if quantization == "none":
        return
    require_bitsandbytes(quantization)
    name = str(getattr(distributed_type, "value", distributed_type) or "")
    if name.upper() in ("FSDP", "DEEPSPEED"):
        raise ValueError(f"quantization={quantization} cannot be combined with {name.upper()}: sharding a "
                         "bitsandbytes-quantised base is not supported here. Launch one process per GPU without "
                         "sharding (DDP: plain accelerate launch / run.sh; a 4-bit 8B base fits one GPU), or keep "
                         "the sharded launch with quantization=none (docs/quantization.md)")


def load_quantized(cls: Any, source: str, quantization: str, compute_dtype: torch.dtype, **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(source)`` with its linear layers quantised (:func:`bitsandbytes_config`, on
    :func:`quantized_device_map`), then :func:`prepare_kbit_model`. ``kwargs`` go to ``from_pretrained``
    (the dtype among them: the dtype of everything that stays unquantised)."""
    config = bitsandbytes_config(quantization, compute_dtype)
    model = cls.from_pretrained(source, quantization_config=config, device_map=quantized_device_map(), **kwargs)
    return prepare_kbit_model(model)


def quantize_built_model(model: nn.Module, quantization: str, compute_dtype: torch.dtype,
                         **kwargs: Any) -> nn.Module:
    """A transformers model built in memory (a ``random:<family>`` base) quantised the way a checkpoint is:
    saved into a temporary folder and loaded back with :func:`load_quantized` (transformers' own loading
    path, nothing rebuilt by hand; ``kwargs`` go to ``from_pretrained``, the dtype among them). The random
    number generators are restored afterwards, so the MoLE weights initialised next are those of the same
    run in full precision. Meant for the tiny random models: the copy costs a disk write of the model.
    """
    with tempfile.TemporaryDirectory(prefix="ldmole-quantize-") as folder, torch.random.fork_rng(
            devices=range(torch.cuda.device_count())):
        model.save_pretrained(folder)
        return load_quantized(type(model), folder, quantization, compute_dtype, **kwargs)


def _is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (LayerNorm, RMSNorm, LlamaRMSNorm, Qwen3RMSNorm, ...)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


def _cast_input_to_weight(module: nn.Module, args: tuple) -> tuple:
    """A forward pre-hook: floating inputs as the module's weight dtype, read at call time (a trained head that
    ``get_mole_model`` moves to float32 later then gets float32)."""
    dtype = module.weight.dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def prepare_kbit_model(model: nn.Module) -> nn.Module:
    """The k-bit training preparation of a quantised base (what PEFT's ``prepare_model_for_kbit_training``
    does, narrower): every base parameter frozen, normalisation layers in float32, input gradients enabled
    (``enable_input_require_grads``: reentrant gradient checkpointing needs them), and every linear layer
    left unquantised (the output embeddings, a classification head) given a pre-hook that casts its input
    to its weight dtype. Returns ``model``.

    Unlike PEFT, embeddings and output head stay in ``torch_dtype``: in float32 they would cost 2 GB more
    on Llama-3.1-8B (1.05 B parameters) for no gain, since they are frozen. The float32 norms turn the hidden
    states float32 from the first layer on (as under PEFT); the quantised layers compute in ``torch_dtype``
    whatever their input dtype, and the cast hook feeds a bf16 output head bf16.
    """
    bnb = sys.modules.get("bitsandbytes")
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ()
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if quantized and isinstance(module, bnb.nn.Linear4bit):
            # On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight in place at its first
            # no-grad eval forward, for a kernel without autograd (and with bf16 scales): every later forward
            # uses it, so training after an evaluation would get wrong gradients silently (and out_features
            # not a multiple of 32 fail). The generic path serves training and evaluation alike.
            module.support_avx512bf16_for_cpu = False
        if _is_norm(module):
            module.float()
        elif isinstance(module, nn.Linear) and not isinstance(module, quantized) and \
                module.weight.dtype != torch.float32:
            module.register_forward_pre_hook(_cast_input_to_weight)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


def quantization_of(model: nn.Module) -> str:
    """The bitsandbytes quantisation of ``model``'s linear layers ("nf4", "fp4", "int8"), or "none"; MoLE
    layers are looked through (their base layers are the model's modules too)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # never imported: no layer of it can exist
        return "none"
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            return str(getattr(module.weight, "quant_type", None) or module.quant_type)
        if isinstance(module, bnb.nn.Linear8bitLt):
            return "int8"
    return "none"


_NAMES = {"nf4": "4-bit NF4", "fp4": "4-bit FP4", "int8": "8-bit LLM.int8"}


def model_card_note(quantization: str, torch_dtype: str) -> str:
    """The model card's paragraph on the base an adapter was trained on ("" for a full-precision base)."""
    if quantization == "none":
        return ""
    return (f"The base model was loaded in {_NAMES[quantization]} (bitsandbytes, `quantization={quantization}`, "
            f"compute dtype {torch_dtype}; QLoRA) while training; the adapter itself is float32 and holds no base "
            "weight. It loads on the quantised base (the default of `ldmole.from_pretrained`, which needs "
            f"`{QLORA_EXTRA}`) and on a full-precision one (`quantization=\"none\"`, "
            "`--quantization none`), whose outputs differ from the quantised base's by the quantisation error.")


# --- base-weight memory ---------------------------------------------------------------------------


def _kept_linears(model: nn.Module) -> set[int]:
    """ids of the linear modules transformers leaves unquantised: the output embeddings, and the module
    holding the model's last parameter (a classification head) (``get_keys_to_not_convert``)."""
    kept = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        kept.add(id(output))
    named = list(model.named_parameters())
    if named:
        owner = named[-1][0].rpartition(".")[0]
        kept.add(id(model.get_submodule(owner)))
    return kept


def quantized_linear_names(model: nn.Module) -> list[str]:
    """The names of the linear layers of an unquantised ``model`` that bitsandbytes quantises on loading."""
    kept = _kept_linears(model)
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and id(m) not in kept]


def _quantized_linear_bytes(weight_shape: torch.Size, quantization: str) -> int:
    """Bytes a quantised linear weight [out, in] holds: the packed weight and its scales.

    int8: one byte a weight and one float32 scale a row (``SCB``). 4-bit: half a byte a weight, one 8-bit
    block scale per 64 weights (double quantisation), one float32 scale per 256 block scales, the 256-entry
    float32 code of the scales, the 16-entry float32 4-bit code and the scales' float32 offset.
    """
    numel = math.prod(weight_shape)
    if quantization == "int8":
        return numel + 4 * weight_shape[0]
    blocks = math.ceil(numel / BLOCKSIZE_4BIT)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / BLOCKSIZE_NESTED) + 4 * 256 + 4 * 16 + 4


def base_weight_bytes(model: nn.Module, quantization: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of ``model``'s weights once loaded with ``quantization`` in ``dtype`` and prepared for training,
    computed from the parameter shapes of the unquantised model (it may live on the meta device): quantised
    linear weights as :func:`_quantized_linear_bytes`, normalisation weights in float32
    (:func:`prepare_kbit_model`; ``dtype`` with quantization none), everything else in ``dtype``, tied
    weights once. Buffers (rotary frequencies) are not weights and not counted."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: choose one of {QUANTIZATIONS}")
    element = torch.empty((), dtype=dtype).element_size()
    quantized = set(quantized_linear_names(model)) if quantization != "none" else set()
    norms = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    total, seen = 0, set()
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if name in quantized and param is module.weight:
                total += _quantized_linear_bytes(param.shape, quantization)
            elif id(param) in norms and quantization != "none":
                total += 4 * param.numel()
            else:
                total += element * param.numel()
    return total


def loaded_weight_bytes(model: nn.Module) -> int:
    """Bytes the weights of a loaded model occupy, read from its tensors: each parameter's storage once, a
    4-bit weight's quantisation state (block scales, codes, offset) and an 8-bit weight's row scales (on the
    weight until the first forward, on the layer's state after it) too."""
    total, seen = 0, set()

    def nbytes(tensor: Optional[torch.Tensor]) -> int:
        return tensor.numel() * tensor.element_size() if torch.is_tensor(tensor) else 0

    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += nbytes(param.data)
            state = getattr(param, "quant_state", None)
            if state is not None:
                total += nbytes(state.absmax) + nbytes(state.code)
                if state.nested:
                    total += nbytes(state.offset) + nbytes(state.state2.absmax) + nbytes(state.state2.code)
            if hasattr(param, "SCB"):  # an 8-bit weight
                scales = param.SCB if param.SCB is not None else getattr(getattr(module, "state", None), "SCB", None)
                total += nbytes(scales)
    return total


def llama31_8b_config():
    """The ``LlamaConfig`` of meta-llama/Llama-3.1-8B (configs/models/llama3.1_8b.yaml's base), as its
    config.json on the hub gives it (a gated repository, so written out here)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                       rope_theta=500000.0)


def llama31_8b_weight_memory(quantizations: tuple[str, ...] = ("none", "int8", "nf4")) -> dict[str, Any]:
    """Computed (not measured) base-weight memory of Llama-3.1-8B in bf16 and with each quantisation:
    the model built on the meta device from :func:`llama31_8b_config`, bytes by :func:`base_weight_bytes`.
    Returns ``{"parameters": N, "quantized_parameters": M, "bytes": {quantization: bytes}}``."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama31_8b_config())
    quantized = set(quantized_linear_names(model))
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "quantized_parameters": sum(m.weight.numel() for n, m in model.named_modules() if n in quantized),
            "bytes": {q: base_weight_bytes(model, q, torch.bfloat16) for q in quantizations}}
