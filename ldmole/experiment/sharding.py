"""Reading and writing the trained weights when training may be sharded (FSDP, DeepSpeed ZeRO-3).

Under FSDP or ZeRO-3 each process holds only a slice of every parameter, so reading
``mole_parameters(model)`` directly would save a fragment. Saving therefore goes through
``accelerator.get_state_dict`` (a collective: every process calls it; the full values arrive on the
main process), and loading a full state into a sharded model through
``torch.distributed.checkpoint.state_dict`` (also collective). On one process and under DDP every
function here does exactly what the trainer did before: read or copy the parameters themselves.

The state dicts of the prepared model are those of :class:`~ldmole.experiment.selected_logits.SelectedLogits`,
whose base model is its ``model`` attribute: a MoLE parameter ``n`` of the base is ``model.n`` there.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..core.injection import mole_parameters

__all__ = ["MODEL_PREFIX", "is_sharded", "reshard", "mole_state_from", "gather_mole_state", "load_mole_state",
           "optimizer_state", "load_optimizer_state", "clip_parameters"]

MODEL_PREFIX = "model."


def is_sharded(accelerator) -> bool:
    """True when parameters are split across processes (FSDP, or DeepSpeed ZeRO stage 3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.deepspeed_config["zero_optimization"]["stage"] == 3
    return False


def _is_fsdp(accelerator) -> bool:
    """True under FSDP (versions 1 and 2)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def reshard(model: nn.Module) -> None:
    """Puts every FSDP2 unit of ``model`` back to its sharded parameters (a no-op for others).

    FSDP2 leaves a unit's parameters gathered after a forward that is not followed by a backward
    (evaluation) when it does not reshard after forward (the root unit by default, every unit with
    ``fsdp_reshard_after_forward: false``); the module then holds plain tensors that the optimiser
    does not know, and ``get_optimizer_state_dict`` fails with a ``KeyError`` on a parameter index.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def mole_state_from(full_state: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """The MoLE weights (by base-model name, detached, on the CPU) out of the prepared model's full state dict.

    Raises:
        KeyError: a MoLE weight is missing from ``full_state`` (naming it).
    """
    missing = [name for name in names if MODEL_PREFIX + name not in full_state]
    if missing:
        raise KeyError(f"the gathered state dict lacks MoLE weights {missing[:3]} ({len(missing)} in all); "
                       f"its keys look like {list(full_state)[:3]}")
    return {name: full_state[MODEL_PREFIX + name].detach().to("cpu") for name in names}


def gather_mole_state(accelerator, wrapped: nn.Module, base: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The full MoLE weights (CPU tensors): on every process unsharded, on the main process only
    (None elsewhere) under FSDP / ZeRO-3, where it is a collective that every process must call at
    the same point. The tensors may share memory with the parameters: clone them to keep a snapshot.
    """
    if _is_fsdp(accelerator):
        reshard(wrapped)
    full_state = accelerator.get_state_dict(wrapped)
    if is_sharded(accelerator) and not accelerator.is_main_process:
        return None
    return mole_state_from(full_state, list(mole_parameters(base)))


def load_mole_state(accelerator, wrapped: nn.Module, base: nn.Module,
                    weights: Optional[Mapping[str, torch.Tensor]]) -> None:
    """Copies full MoLE weights into the model. Unsharded: every process passes them and they are
    copied into the parameters. FSDP: collective; the main process's ``weights`` are sent to all
    (the others may pass None) and each keeps its slice.

    Raises:
        NotImplementedError: under DeepSpeed ZeRO-3 (resuming and restoring the best epoch are FSDP-only).
    """
    if not is_sharded(accelerator):
        with torch.no_grad():
            for name, param in mole_parameters(base).items():
                param.copy_(weights[name])
        return
    if not _is_fsdp(accelerator):
        raise NotImplementedError("loading MoLE weights into a DeepSpeed ZeRO-3 model (resume, best-epoch restore) "
                                  "is not implemented; train sharded with FSDP instead "
                                  "(docs/multi_gpu.md, 'Sharded training')")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    reshard(wrapped)
    full = {MODEL_PREFIX + name: tensor for name, tensor in (weights or {}).items()} if accelerator.is_main_process else {}
    set_model_state_dict(wrapped, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                 strict=False))


def optimizer_state(accelerator, wrapped: nn.Module, optimizer) -> Optional[dict[str, Any]]:
    """The optimiser state to checkpoint: the optimiser's own state dict unsharded; under FSDP the
    full (gathered) one, on the main process only. Collective under FSDP."""
    if not _is_fsdp(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    reshard(wrapped)
    state = get_optimizer_state_dict(wrapped, getattr(optimizer, "optimizer", optimizer),
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if accelerator.is_main_process else None


def load_optimizer_state(accelerator, wrapped: nn.Module, optimizer, state: Mapping[str, Any]) -> None:
    """Restores what :func:`optimizer_state` returned (collective under FSDP, every process passes it)."""
    if not _is_fsdp(accelerator):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    reshard(wrapped)
    set_optimizer_state_dict(wrapped, getattr(optimizer, "optimizer", optimizer), optim_state_dict=dict(state),
                             options=StateDictOptions(full_state_dict=True))


def clip_parameters(accelerator, wrapped: nn.Module, trainable: list[nn.Parameter]):
    """What to hand ``accelerator.clip_grad_norm_``: the trainable parameters, except under FSDP,
    where accelerate computes the global norm only when given the prepared model's own parameters
    (frozen ones have no gradient, so the norm is the same)."""
    return list(wrapped.parameters()) if _is_fsdp(accelerator) else trainable
