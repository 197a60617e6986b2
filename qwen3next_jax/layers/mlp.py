"""Dense SwiGLU feed-forward: the shared expert and any dense (mlp_only) layer."""

from __future__ import annotations

import jax
from flax import nnx

from qwen3next_jax import sharding
from qwen3next_jax.layers import params


class SwiGLU(nnx.Module):
    """down(silu(x @ gate) * (x @ up)); weights [D, F], [D, F], [F, D]."""

    def __init__(self, hidden: int, width: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.w_gate_DF = params.normal(rngs, (hidden, width), ("embed", "mlp"), std, param_dtype)
        self.w_up_DF = params.normal(rngs, (hidden, width), ("embed", "mlp"), std, param_dtype)
        self.w_down_FD = params.normal(rngs, (width, hidden), ("mlp", "embed"), std, param_dtype)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        gate_BTF = params.project(x_BTD, self.w_gate_DF, "btd,df->btf", self.dtype)
        up_BTF = params.project(x_BTD, self.w_up_DF, "btd,df->btf", self.dtype)
        h_BTF = sharding.constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "seq", "act_mlp"))
        return params.project(h_BTF, self.w_down_FD, "btf,fd->btd", self.dtype)
