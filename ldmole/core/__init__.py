"""The library: Sparsegen, λ-MLP, routers, `MoLELinear`, injection, routing records, losses, adapter
save/load, and the dense-einsum reference layer. Needs only torch (and safetensors for save/load); no
transformers, no accelerate."""
