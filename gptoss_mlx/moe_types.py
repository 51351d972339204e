"""The contract between the model and its experts backends (a leaf module: imports only MLX).

`QWeights` is one projection of all experts in the converted MXFP4 layout: (weight uint32
[E, out, in/8], scales uint8 E8M0 [E, out, in/32], bias [E, out]). `MoeFn` is the signature every
backend implements (`gptoss_mlx.model.experts.moe`, `gptoss_mlx.kernels.moe.moe`):

    moe(x [N, H], indices [N, k], route_weights [N, k], gate, up, down,
        swiglu_limit=7.0, alpha=1.702, *, residual=None) -> [N, H] (dtype of x)
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx

QWeights = tuple[mx.array, mx.array, mx.array]


class MoeFn(Protocol):
    """`sum_k w_k (W_d swiglu(W_g x + b_g, W_u x + b_u) + b_d)[e_k]` (+ `residual`)."""

    def __call__(self, x: mx.array, indices: mx.array, route_weights: mx.array, gate: QWeights,
                 up: QWeights, down: QWeights, swiglu_limit: float = 7.0, alpha: float = 1.702,
                 *, residual: mx.array | None = None) -> mx.array: ...
