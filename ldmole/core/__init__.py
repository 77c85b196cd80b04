"""The library: Sparsegen, λ-MLP, routers, `MoLELinear`, injection, routing records, losses and
adapter save/load. Needs only torch (and safetensors for save/load); no transformers, no accelerate."""
