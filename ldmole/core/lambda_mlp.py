"""`LambdaMLP`: the small shared network that predicts the Sparsegen λ of every token."""

from __future__ import annotations

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

    Computed in float32 whatever the input dtype or autocast state. Modules that receive the very
    same input tensor one after another (q/k/v, gate/up) get λ computed once: the last input and
    its λ are kept until the input, a parameter or the grad mode changes, or :meth:`clear_cache`
    is called (the model does so at the start and end of every forward).

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
        self._cache: tuple | None = None

    def extra_repr(self) -> str:
        return f"eps={self.eps}, init={self.init}, input_norm={self.input_norm}"

    def _key(self, x: torch.Tensor) -> tuple:
        """What must be unchanged for a cached λ to be reused (all host-side metadata, no sync)."""
        return (x._version, torch.is_grad_enabled(), *(p._version for p in self.parameters()))

    def clear_cache(self) -> None:
        """Drops the cached input and λ."""
        self._cache = None

    def hidden_activations(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(W1 n(x) + b1) ``[..., H]`` in float32 (what fires; used by the λ probes)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            if self.input_norm == "rms":
                x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + _RMS_EPS)
            return F.relu(F.linear(x32, self.fc1.weight.float(), self.fc1.bias.float()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self._cache
        if cache is not None and cache[0] is x and cache[1] == self._key(x):
            return cache[2]
        hidden = self.hidden_activations(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logit = F.linear(hidden, self.fc2.weight.float(), self.fc2.bias.float()).squeeze(-1)
            lam = F.logsigmoid(logit) + (1.0 - self.eps)
        self._cache = (x, self._key(x), lam)
        return lam
