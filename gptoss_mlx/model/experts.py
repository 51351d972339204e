"""The mixture-of-experts layer behind one function signature, with two backends.

    moe(x [N, H], indices [N, k], route_weights [N, k] float32, gate, up, down,
        swiglu_limit=7.0, alpha=1.702, *, residual=None) -> [N, H] (dtype of x)

`gate`, `up` and `down` are `QWeights`: (weight uint32 [E, out, in/8], scales uint8 E8M0
[E, out, in/32], bias [E, out]), the released MXFP4 bytes in MLX's `mode="mxfp4"` packing.
Per chosen expert e: g = W_g x + b_g, u = W_u x + b_u, a = min(g, L) * sigmoid(alpha min(g, L))
* (clip(u, -L, L) + 1), y_e = W_d a + b_d; the output is sum_k w_k y_{e_k}, plus `residual`
when one is given (the model passes its residual stream, which the Metal kernels add for free).

Backends: `mlx` (this module's `moe`, portable: `mx.gather_qmm`) and `metal`
(`gptoss_mlx.kernels.moe.moe`, custom Metal kernels). `resolve_backend` picks one.
"""

from __future__ import annotations

import os
from functools import partial

import mlx.core as mx

from gptoss_mlx.moe_types import MoeFn, QWeights

BACKENDS = ("auto", "mlx", "metal")
ENV_VAR = "GPTOSS_MLX_EXPERTS"
SORT_MIN_PAIRS = 64  # from this many (token, expert) pairs on, group them by expert first


def _qmm(x: mx.array, w: QWeights, indices: mx.array, sorted_indices: bool) -> mx.array:
    """x [..., 1, in] through experts `indices` [...] of `w`, bias added: [..., 1, out]."""
    weight, scales, bias = w
    y = mx.gather_qmm(x, weight, scales, None, rhs_indices=indices, transpose=True,
                      group_size=32, bits=4, mode="mxfp4", sorted_indices=sorted_indices)
    return y + mx.expand_dims(bias[indices], -2)


@partial(mx.compile, shapeless=True)
def swiglu(g: mx.array, u: mx.array, limit: float = 7.0, alpha: float = 1.702) -> mx.array:
    """gpt-oss's clipped SwiGLU: `min(g, L) * sigmoid(alpha min(g, L)) * (clip(u, -L, L) + 1)`."""
    g = mx.minimum(g, limit)
    return g * mx.sigmoid(alpha * g) * (mx.clip(u, -limit, limit) + 1.0)


@partial(mx.compile, shapeless=True)
def combine(y: mx.array, route_weights: mx.array, residual: mx.array) -> mx.array:
    """residual + sum_k w_k y_k in float32: y [N, k, H], route_weights [N, k], residual [N, H]
    (or a zero scalar) -> [N, H] in y's dtype. The sum over k is a matmul: a shapeless compiled
    reduction over a size-1 axis (top-1 routing) crashes MLX 0.32."""
    w = mx.expand_dims(route_weights.astype(mx.float32), -2)  # [N, 1, k]
    return (residual.astype(mx.float32) + (w @ y.astype(mx.float32)).squeeze(-2)).astype(y.dtype)


def _moe_sorted(x: mx.array, indices: mx.array, route_weights: mx.array, gate: QWeights,
               up: QWeights, down: QWeights, limit: float, alpha: float,
               residual: mx.array) -> mx.array:
    """Prefill: one row per (token, slot), grouped by expert so that each expert's weights are
    read once; the results go back to (token, slot) order before the weighted sum."""
    n, k = indices.shape
    flat = indices.flatten()
    order = mx.argsort(flat)
    experts = flat[order]
    xs = mx.expand_dims(x[order // k].astype(mx.float32), -2)  # [pairs, 1, H]
    a = swiglu(_qmm(xs, gate, experts, True), _qmm(xs, up, experts, True), limit, alpha)
    y = _qmm(a, down, experts, True)  # [pairs, 1, H]
    return combine(y[mx.argsort(order)].reshape(n, k, -1), route_weights, residual)


@mx.compile
def _moe_unsorted(x: mx.array, indices: mx.array, route_weights: mx.array, gate: QWeights,
                  up: QWeights, down: QWeights, limit: float, alpha: float,
                  residual: mx.array) -> mx.array:
    """Decode (few tokens): each (token, slot) reads its expert's rows directly; compiled per
    token count, so the whole layer is one fused graph."""
    xs = mx.expand_dims(x.astype(mx.float32), (-2, -3))  # [n, 1, 1, H]
    a = swiglu(_qmm(xs, gate, indices, False), _qmm(xs, up, indices, False), limit, alpha)
    return combine(_qmm(a, down, indices, False).squeeze(-2), route_weights, residual)


def moe(x: mx.array, indices: mx.array, route_weights: mx.array, gate: QWeights, up: QWeights,
        down: QWeights, swiglu_limit: float = 7.0, alpha: float = 1.702, *,
        residual: mx.array | None = None) -> mx.array:
    """Portable MoE experts on `mx.gather_qmm` (MXFP4 read in place); see the module docstring.
    `residual` [N, H], when given, is added to the output (as the Metal backend can fuse it).
    Activations run in float32 whatever x's dtype (the weights stay 4-bit; MLX's CPU
    quantized matmuls would otherwise accumulate in bfloat16)."""
    n, k = indices.shape
    run = _moe_sorted if n * k >= SORT_MIN_PAIRS else _moe_unsorted
    res = mx.zeros((), dtype=x.dtype) if residual is None else residual
    return run(x, indices, route_weights, gate, up, down, swiglu_limit, alpha, res
               ).astype(x.dtype)


def self_check(fn: MoeFn, gate: QWeights, up: QWeights, down: QWeights, top_k: int,
               dtype: mx.Dtype, swiglu_limit: float = 7.0) -> str | None:
    """Run backend `fn` against the portable `moe` on one layer's experts, through a decode-sized
    and a prefill-sized batch of random tokens; None when they agree, else what went wrong."""
    experts, hidden = gate[0].shape[0], gate[0].shape[2] * 8
    tol = 1e-4 if dtype == mx.float32 else 3e-2
    key = mx.random.key(0)
    for n in (1, 37):
        kx, kw, key = mx.random.split(key, 3)
        x = mx.random.normal((n, hidden), key=kx).astype(dtype)
        # k distinct experts per token, every expert used across the batch
        rows = mx.arange(n)[:, None] + mx.arange(top_k)[None, :]
        indices = (rows % experts).astype(mx.uint32)
        weights = mx.softmax(mx.random.normal((n, top_k), key=kw), axis=-1)
        want = moe(x, indices, weights, gate, up, down, swiglu_limit).astype(mx.float32)
        try:
            got = fn(x, indices, weights, gate, up, down, swiglu_limit).astype(mx.float32)
            err = (mx.abs(got - want).max() / mx.maximum(mx.abs(want).max(), 1e-6)).item()
        except Exception as e:  # a kernel that does not compile or run on this device
            return f"{type(e).__name__}: {e}"
        if not err <= tol:
            return f"{n} tokens: relative difference {err:.3g} from the portable experts"
    return None


def metal_moe() -> MoeFn:
    """The Metal kernels' `moe` (raises ImportError when that backend is not installed)."""
    from gptoss_mlx.kernels.moe import moe as kernels_moe

    return kernels_moe


def resolve_backend(experts: str | MoeFn = "auto") -> tuple[str, MoeFn]:
    """The (name, function) of an experts backend: `mlx`, `metal`, `auto`, or a callable.

    `auto` reads `$GPTOSS_MLX_EXPERTS` first (mlx|metal|auto), then picks `metal` when MLX has a
    Metal device and `mlx` otherwise; `metal` without a Metal device raises ValueError. A
    callable with `moe`'s signature is used as given (for example the Metal backend bound to an
    emulated kernel factory with `functools.partial`).
    """
    if callable(experts):
        return getattr(experts, "__name__", "custom"), experts
    name = experts
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if name not in BACKENDS:
            raise ValueError(f"${ENV_VAR}={name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "metal" if mx.metal.is_available() else "mlx"
    if name == "mlx":
        return "mlx", moe
    if name == "metal":
        if not mx.metal.is_available():
            raise ValueError("the metal experts backend needs a Metal device (Apple Silicon); "
                             "mx.metal.is_available() is False here: use experts='mlx'")
        return "metal", metal_moe()
    raise ValueError(f"experts={experts!r}: expected one of {', '.join(BACKENDS)} or a callable")
