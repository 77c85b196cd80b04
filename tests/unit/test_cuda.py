"""Checks that need a CUDA GPU; they skip elsewhere. Run them on a GPU machine with
``python -m pytest -q -m cuda tests``."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from ldmole import LambdaMLP, MoLEConfig, MoLELinear, routing_records

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROUTERS = ["sparsegen", "sparsegen_fixed", "topk", "relu", "softmax", "lora"]


def layer_pair(router: str, seed: int = 0) -> tuple[MoLELinear, MoLELinear]:
    """The same adapted 256 -> 384 projection on the CPU in float32 and on the GPU in bfloat16."""
    torch.manual_seed(seed)
    base = nn.Linear(256, 384, bias=False)
    experts = 1 if router == "lora" else 8
    mlp = LambdaMLP(256, 64) if router == "sparsegen" else None
    config = MoLEConfig(router=router, num_experts=experts, r=8, alpha=16, top_k=2, dropout=0.0,
                        fixed_lambda=-1.0 if router == "sparsegen_fixed" else None)
    cpu = MoLELinear(base, config, num_experts=experts, lambda_mlp=mlp)
    with torch.no_grad():
        cpu.lora_B.normal_(std=0.05)
    gpu_base = nn.Linear(256, 384, bias=False).to("cuda", torch.bfloat16)
    gpu_base.weight.data.copy_(base.weight.data)
    gpu_mlp = None
    if mlp is not None:
        gpu_mlp = LambdaMLP(256, 64).cuda()
        gpu_mlp.load_state_dict(mlp.state_dict())
    gpu = MoLELinear(gpu_base, config, num_experts=experts, lambda_mlp=gpu_mlp)
    gpu.load_state_dict(cpu.state_dict())
    return cpu.eval(), gpu.eval()


@pytest.mark.parametrize("router", ROUTERS)
def test_bf16_layer_on_gpu_matches_fp32_on_cpu_with_float32_routing(router):
    cpu, gpu = layer_pair(router)
    x = torch.randn(2, 64, 256)
    expected = cpu(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = gpu(x.to("cuda", torch.bfloat16))
    assert got.dtype == torch.bfloat16
    scale = expected.abs().mean()
    assert (got.float().cpu() - expected).abs().mean() < 0.02 * scale, "bf16 output too far from fp32"
    if router != "lora":
        record = routing_records(gpu)[0]
        assert record.weights.dtype == torch.float32 and record.scores.dtype == torch.float32
        if router != "topk":  # top-k may flip near-ties under bf16 rounding
            torch.testing.assert_close(record.weights.cpu(), routing_records(cpu)[0].weights, atol=0.02, rtol=0.05)


@pytest.mark.parametrize("router", ["sparsegen", "softmax", "lora"])
def test_bf16_backward_on_gpu_gives_float32_adapter_gradients_close_to_fp32(router):
    cpu, gpu = layer_pair(router)
    x = torch.randn(2, 64, 256)
    cpu(x).square().mean().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu(x.to("cuda", torch.bfloat16)).float().square().mean().backward()
    for name in ("lora_A", "lora_B"):
        got, expected = getattr(gpu, name).grad, getattr(cpu, name).grad
        assert got.dtype == torch.float32
        relative = (got.cpu() - expected).norm() / expected.norm().clamp_min(1e-12)
        assert relative < 0.05, f"{router} {name}: relative gradient error {relative:.3f}"
