"""The MoE experts on custom Metal kernels (`mx.fast.metal_kernel`), MXFP4 read in place.

Same signature (`gptoss_mlx.moe_types.MoeFn`) as the portable backend (model/experts.py). Decode
(few tokens) takes two dispatches: a fused gate+up GEMV with biases and clipped SwiGLU, then a down
GEMV that applies the bias, weights the K experts by their router scores and sums them (optionally
into the residual). Prefill groups the (token, slot) pairs by expert with an argsort and runs a
tiled grouped GEMM for gate+up, one for down (bias and router weight fused), and a gather that
sums each token's K rows. Kernel bodies live in metal/*.metal (see metal/DESIGN.md).
`kernel_factory` defaults to `mx.fast.metal_kernel`; tests pass the CPU emulator's factory to run
the same code path on Linux.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from gptoss_mlx.metal import source
from gptoss_mlx.moe_types import QWeights

KernelFactory = Callable[..., Any]

DECODE_MAX_TOKENS = 16  # up to this many tokens: per-pair GEMV kernels (no sort, 2 dispatches)
ROWS_PER_SIMDGROUP = 4  # output rows one SIMD group computes in the GEMV kernels
THREADS = 256  # threads per threadgroup in every kernel
TILE = 32  # rows/columns of a grouped-GEMM tile (= one MXFP4 block of inputs per step)

# kernel -> (input names, output names); the body is metal/<kernel>.metal, the header mxfp4.metal.
KERNELS: dict[str, tuple[list[str], list[str]]] = {
    "moe_gate_up_gemv": (["x", "indices", "gate_w", "gate_s", "gate_b", "up_w", "up_s", "up_b",
                          "params"], ["act"]),
    "moe_down_gemv": (["act", "indices", "route_w", "down_w", "down_s", "down_b", "residual"],
                      ["y"]),
    "moe_gate_up_gemm": (["x", "order", "sorted_experts", "gate_w", "gate_s", "gate_b", "up_w",
                          "up_s", "up_b", "params"], ["act"]),
    "moe_down_gemm": (["act", "order", "sorted_experts", "route_w", "down_w", "down_s", "down_b"],
                      ["y_pairs"]),
    "moe_combine": (["y_pairs", "residual"], ["out"]),
}
KERNELS["moe_gate_up_mma"] = KERNELS["moe_gate_up_gemm"]  # the same GEMMs on simdgroup_matrix
KERNELS["moe_down_mma"] = KERNELS["moe_down_gemm"]
# prefill GEMM variant -> (gate+up kernel, down kernel): scalar FMAs or 8x8 matrix-unit MMAs
GEMMS = {"fma": ("moe_gate_up_gemm", "moe_down_gemm"), "mma": ("moe_gate_up_mma", "moe_down_mma")}

_CACHE: dict[tuple[KernelFactory, str], Any] = {}


@functools.lru_cache(maxsize=16)
def _params(swiglu_limit: float, alpha: float) -> mx.array:
    """The SwiGLU constants as the small `params` input (built once per value pair)."""
    return mx.array([swiglu_limit, alpha], dtype=mx.float32)


@functools.lru_cache(maxsize=8)
def _no_residual(dtype: mx.Dtype) -> mx.array:
    """A 1-element stand-in bound to `residual` when there is none (RESIDUAL=false)."""
    return mx.zeros((1,), dtype=dtype)


def kernel(name: str, kernel_factory: KernelFactory | None = None) -> Any:
    """The kernel object `kernel_factory` (default `mx.fast.metal_kernel`) builds for `name`."""
    factory = kernel_factory or mx.fast.metal_kernel
    key = (factory, name)
    if key not in _CACHE:
        inputs, outputs = KERNELS[name]
        _CACHE[key] = factory(name=f"gptoss_{name}", input_names=inputs, output_names=outputs,
                              source=source(name), header=source("mxfp4"))
    return _CACHE[key]


def _check(x: mx.array, indices: mx.array, route_weights: mx.array, gate: QWeights,
           up: QWeights, down: QWeights, residual: mx.array | None) -> tuple[int, int, int, int]:
    if x.ndim != 2:
        raise ValueError(f"moe: x must be [N, H], got shape {tuple(x.shape)}")
    n, h = x.shape
    if indices.ndim != 2 or indices.shape[0] != n or indices.dtype not in (mx.int32, mx.uint32):
        raise ValueError(f"moe: indices must be int32/uint32 [N={n}, k], got "
                         f"{indices.dtype} {tuple(indices.shape)}")
    k = indices.shape[1]
    if tuple(route_weights.shape) != (n, k):
        raise ValueError(f"moe: route_weights must be [{n}, {k}], got {tuple(route_weights.shape)}")
    e, i = gate[0].shape[0], gate[0].shape[1]
    if h % 32 or i % 32:
        raise ValueError(f"moe: hidden ({h}) and intermediate ({i}) sizes must be multiples of 32")
    for label, (w, s, b), out_dim, in_dim in (("gate", gate, i, h), ("up", up, i, h),
                                              ("down", down, h, i)):
        want = ((e, out_dim, in_dim // 8), (e, out_dim, in_dim // 32), (e, out_dim))
        got = (tuple(w.shape), tuple(s.shape), tuple(b.shape))
        if got != want or w.dtype != mx.uint32 or s.dtype != mx.uint8:
            raise ValueError(f"moe: {label} weights must be (uint32 {want[0]}, uint8 {want[1]}, "
                             f"bias {want[2]}), got ({w.dtype} {got[0]}, {s.dtype} {got[1]}, "
                             f"{b.dtype} {got[2]})")
    if residual is not None and tuple(residual.shape) != (n, h):
        raise ValueError(f"moe: residual must be [{n}, {h}], got {tuple(residual.shape)}")
    return n, h, i, k


def decode_gate_up(x: mx.array, indices: mx.array, gate: QWeights, up: QWeights,
                   params: mx.array, kernel_factory: KernelFactory | None = None) -> mx.array:
    """Decode dispatch 1: act [N * k, I] float32 = swiglu(gate, up) per (token, slot) pair."""
    (n, h), k, i = x.shape, indices.shape[1], gate[0].shape[1]
    r = ROWS_PER_SIMDGROUP
    return kernel("moe_gate_up_gemv", kernel_factory)(
        inputs=[x, indices, *gate, *up, params],
        template=[("T", x.dtype), ("B", gate[2].dtype), ("IT", indices.dtype), ("H", h),
                  ("I", i), ("K", k), ("R", r)],
        grid=(32 * -(-i // r), n * k, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(n * k, i)], output_dtypes=[mx.float32])[0]


def decode_down(act: mx.array, indices: mx.array, route_weights: mx.array, down: QWeights,
                residual: mx.array | None, out_dtype: mx.Dtype,
                kernel_factory: KernelFactory | None = None) -> mx.array:
    """Decode dispatch 2: [N, H] = sum_k w_k (W_d act_k + b_d) (+ residual)."""
    (n, k), h, i = indices.shape, down[0].shape[1], act.shape[1]
    r = ROWS_PER_SIMDGROUP
    res = residual if residual is not None else _no_residual(out_dtype)
    return kernel("moe_down_gemv", kernel_factory)(
        inputs=[act, indices, route_weights, *down, res],
        template=[("T", out_dtype), ("B", down[2].dtype), ("IT", indices.dtype), ("H", h),
                  ("I", i), ("K", k), ("R", r), ("RESIDUAL", residual is not None)],
        grid=(32 * -(-h // r), n, 1), threadgroup=(THREADS, 1, 1), output_shapes=[(n, h)],
        output_dtypes=[out_dtype])[0]


def sort_pairs(indices: mx.array) -> tuple[mx.array, mx.array]:
    """(order uint32, sorted_experts): the (token, slot) pair ids n * k + slot grouped by expert
    (two MLX ops: argsort and a gather)."""
    flat = indices.reshape(-1)
    order = mx.argsort(flat)
    return order, flat[order]


def prefill_gate_up(x: mx.array, order: mx.array, sorted_experts: mx.array, k: int,
                    gate: QWeights, up: QWeights, params: mx.array,
                    kernel_factory: KernelFactory | None = None, gemm: str = "fma") -> mx.array:
    """Prefill dispatch 1: act [P, I] float32 for the sorted pairs (row m is pair order[m])."""
    (p,), h, i = order.shape, x.shape[1], gate[0].shape[1]
    return kernel(GEMMS[gemm][0], kernel_factory)(
        inputs=[x, order, sorted_experts, *gate, *up, params],
        template=[("T", x.dtype), ("B", gate[2].dtype), ("H", h), ("I", i), ("K", k)],
        grid=(THREADS * (i // TILE), -(-p // TILE), 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(p, i)], output_dtypes=[mx.float32])[0]


def prefill_down(act: mx.array, order: mx.array, sorted_experts: mx.array,
                 route_weights: mx.array, down: QWeights,
                 kernel_factory: KernelFactory | None = None, gemm: str = "fma") -> mx.array:
    """Prefill dispatch 2: y_pairs [P, H] float32, row p = w_p (W_d act + b_d), in pair order."""
    (p, i), h = act.shape, down[0].shape[1]
    k = route_weights.shape[-1]
    return kernel(GEMMS[gemm][1], kernel_factory)(
        inputs=[act, order, sorted_experts, route_weights.reshape(-1), *down],
        template=[("B", down[2].dtype), ("H", h), ("I", i), ("K", k)],
        grid=(THREADS * (h // TILE), -(-p // TILE), 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(p, h)], output_dtypes=[mx.float32])[0]


def combine(y_pairs: mx.array, k: int, residual: mx.array | None, out_dtype: mx.Dtype,
            kernel_factory: KernelFactory | None = None) -> mx.array:
    """Prefill dispatch 3: out [N, H] = sum over each token's k rows of y_pairs (+ residual)."""
    p, h = y_pairs.shape
    n = p // k
    res = residual if residual is not None else _no_residual(out_dtype)
    return kernel("moe_combine", kernel_factory)(
        inputs=[y_pairs, res],
        template=[("T", out_dtype), ("H", h), ("K", k), ("RESIDUAL", residual is not None)],
        grid=(n * h // 4, 1, 1), threadgroup=(THREADS, 1, 1), output_shapes=[(n, h)],
        output_dtypes=[out_dtype])[0]


def moe(x: mx.array, indices: mx.array, route_weights: mx.array, gate: QWeights, up: QWeights,
        down: QWeights, swiglu_limit: float = 7.0, alpha: float = 1.702, *,
        residual: mx.array | None = None, path: str = "auto", gemm: str = "fma",
        kernel_factory: KernelFactory | None = None) -> mx.array:
    """sum_k w_k * (W_d swiglu(W_g x + b_g, W_u x + b_u) + b_d)[expert e_k], on Metal kernels.

    x [N, H] (bfloat16/float16/float32), indices [N, k] (int32/uint32), route_weights [N, k];
    gate/up/down are (weight uint32 [E, out, in/8], scales uint8 [E, out, in/32], bias [E, out]).
    Returns [N, H] in x's dtype, plus `residual` when given. `path` forces "decode" or "prefill"
    (default: decode for at most DECODE_MAX_TOKENS tokens); `gemm` picks the prefill GEMMs: "fma"
    (scalar FMAs on staged tiles) or "mma" (simdgroup_matrix 8x8). `kernel_factory` replaces
    `mx.fast.metal_kernel` (the tests pass the CPU emulator's).
    """
    n, _, _, k = _check(x, indices, route_weights, gate, up, down, residual)
    if path == "auto":
        path = "decode" if n <= DECODE_MAX_TOKENS else "prefill"
    if path not in ("decode", "prefill"):
        raise ValueError(f"moe: path must be auto, decode or prefill, got {path!r}")
    if gemm not in GEMMS:
        raise ValueError(f"moe: gemm must be one of {', '.join(GEMMS)}, got {gemm!r}")
    params = _params(float(swiglu_limit), float(alpha))
    route_weights = route_weights.astype(mx.float32)
    if path == "decode":
        act = decode_gate_up(x, indices, gate, up, params, kernel_factory)
        return decode_down(act, indices, route_weights, down, residual, x.dtype, kernel_factory)
    order, sorted_experts = sort_pairs(indices)
    act = prefill_gate_up(x, order, sorted_experts, k, gate, up, params, kernel_factory, gemm)
    y_pairs = prefill_down(act, order, sorted_experts, route_weights, down, kernel_factory, gemm)
    return combine(y_pairs, k, residual, x.dtype, kernel_factory)
