"""`LambdaMLP`: the small shared network that predicts the Sparsegen λ of every token."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LAMBDA_INITS, LAMBDA_INPUT_NORMS

__all__ = ["LambdaMLP"]

_RMS_EPS = 1e-6


class LambdaMLP(nn.Module):
    """λ(x) = logsigmoid(W2 ReLU(W1 n(x) + b1) + b2) + (1 - eps), so λ < 1 - eps for every token.

    ``n`` is the identity, or with ``input_norm="rms"`` the parameter-free RMS normalisation
    x / sqrt(mean(x²) + 1e-6), so that one MLP shared by every layer sees inputs of one scale.
    Weights are kaiming-uniform(a=√5) (``nn.Linear``'s default). Biases follow ``init``:

    - ``"live"``: b1 = 0, b2 = ``bias_init``. About half of the hidden units fire on any input, so
      λ starts near logsigmoid(bias_init) + 1 - eps (-1.59 at -2.5: a near-dense start) with a
      per-token spread, and W1 receives gradient from the first step.
    - ``"reference"``: b1 = b2 = ``bias_init``, as the authors' release. A hidden unit's
      pre-activation has std RMS(x)/√3, so with b1 = -2.5 it fires with probability
      Φ(-2.5·√3 / RMS(x)) (7.5e-6 at RMS 1): on real inputs no unit fires, W1 gets no gradient and
      λ is one learned constant b2 per MLP (fixed-λ Sparsegen). Kept for exact replication.

    Computed in float32 whatever the input dtype or autocast state. :meth:`forward` always computes.
    ``MoLELinear`` computes λ in two halves instead: the first layer's pre-activation W1 x + b1 in the
    same GEMM as its router's scores (when ``input_norm="none"``, :attr:`fusable`), then
    :meth:`lam_from_preactivation`; and it computes λ once per distinct input: the memo
    (:meth:`recall`, :meth:`remember`) keeps the last input and its λ, so modules that receive the very
    same tensor one after another (q/k/v, gate/up) share it. The memo holds until the input (in place),
    a parameter or the grad mode changes, or :meth:`clear_cache` is called (the model's routing context
    does so at the start and end of every forward; a layer used on its own after each of its forwards).

    Args:
        in_features: width d_in of the input.
        hidden: hidden width H.
        eps: the margin below 1 (``lambda_eps``), in (0, 1).
        init: ``"live"`` or ``"reference"`` (``lambda_init``).
        bias_init: the output bias b2 (and b1 under ``"reference"``).
        input_norm: ``"none"`` or ``"rms"`` (``lambda_input_norm``).
    Shapes: ``x [..., d_in] -> λ [...]`` (float32).
    """

    def __init__(self, in_features: int, hidden: int, eps: float = 0.01, init: str = "live",
                 bias_init: float = -2.5, input_norm: str = "none") -> None:
        super().__init__()
        if init not in LAMBDA_INITS:
            raise ValueError(f"LambdaMLP: init={init!r} (MoLEConfig.lambda_init) is unknown; "
                             f"choose one of {LAMBDA_INITS}")
        if input_norm not in LAMBDA_INPUT_NORMS:
            raise ValueError(f"LambdaMLP: input_norm={input_norm!r} (MoLEConfig.lambda_input_norm) is unknown; "
                             f"choose one of {LAMBDA_INPUT_NORMS}")
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.eps = float(eps)
        self.init = init
        self.input_norm = input_norm
        nn.init.constant_(self.fc1.bias, bias_init if init == "reference" else 0.0)
        nn.init.constant_(self.fc2.bias, bias_init)
        self._memo: Optional[tuple] = None

    def extra_repr(self) -> str:
        return f"eps={self.eps}, init={self.init}, input_norm={self.input_norm}"

    @property
    def fusable(self) -> bool:
        """Whether W1 reads the layer input itself (no input norm), so its GEMM can join the router's."""
        return self.input_norm == "none"

    def _memo_key(self, x: torch.Tensor) -> tuple:
        """What must be unchanged for a remembered λ to be reused (host-side metadata, no sync). Compiled
        code keys on the grad mode alone (dynamo cannot trace ``_version``): there the memo lives for one
        model forward, which the routing context clears."""
        if torch.compiler.is_compiling():
            return (torch.is_grad_enabled(),)
        fc1, fc2 = self.fc1, self.fc2
        return (torch.is_grad_enabled(), x._version, fc1.weight._version, fc1.bias._version, fc2.weight._version,
                fc2.bias._version)

    def recall(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """λ of ``x`` when it is the very tensor last remembered (and nothing changed since), else None."""
        memo = self._memo
        if memo is not None and memo[0] is x and memo[1] == self._memo_key(x):
            return memo[2]
        return None

    def remember(self, x: torch.Tensor, lam: torch.Tensor) -> None:
        """Keeps ``x`` and its λ for :meth:`recall` (replacing the previous pair)."""
        self._memo = (x, self._memo_key(x), lam)

    def clear_cache(self) -> None:
        """Drops the remembered input and λ."""
        self._memo = None

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        """n(x) in float32 (call with autocast off)."""
        x32 = x.float()
        if self.input_norm == "rms":
            x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + _RMS_EPS)
        return x32

    def hidden_activations(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(W1 n(x) + b1) ``[..., H]`` in float32 (what fires; used by the λ probes)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.relu(F.linear(self._normed(x), self.fc1.weight.float(), self.fc1.bias.float()))

    def lam_from_preactivation(self, pre: torch.Tensor) -> torch.Tensor:
        """λ ``[...]`` (float32) from the first layer's pre-activation W1 n(x) + b1 ``[..., H]`` (float32)."""
        with torch.autocast(device_type=pre.device.type, enabled=False):
            logit = F.linear(F.relu(pre), self.fc2.weight.float(), self.fc2.bias.float()).squeeze(-1)
            return F.logsigmoid(logit) + (1.0 - self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            pre = F.linear(self._normed(x), self.fc1.weight.float(), self.fc1.bias.float())
        return self.lam_from_preactivation(pre)
