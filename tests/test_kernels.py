"""The Metal MoE kernels, run on the CPU MSL emulator under several schedules (and through
`mx.fast.metal_kernel` itself where Metal exists), against a numpy reference of the exact math and
against MLX's own `mx.gather_qmm(mode="mxfp4")`; deliberate mutations of the kernel text must
fail; the emulator's signatures must equal MLX's."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from msl_emulator import EmulatorError, make_factory, mlx_generated_source

from gptoss_mlx.kernels import moe as km

SCHEDULES = ["forward", "reverse", "random"]
# Emulator schedules, plus the real GPU when there is one.
BACKENDS = SCHEDULES + (["metal"] if mx.metal.is_available() else [])
pytestmark = pytest.mark.skipif(shutil.which("g++") is None,
                                reason="the MSL emulator needs g++")
# decode: the GEMV kernels; prefill: the grouped GEMMs with scalar FMAs; prefill-mma: the grouped
# GEMMs on simdgroup_matrix 8x8 multiply-accumulates.
PATHS = ["decode", "prefill", "prefill-mma"]
LIMIT, ALPHA = 7.0, 1.702
FP4 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float64)


def path_args(path: str) -> dict[str, str]:
    """`km.moe` keyword arguments for one of PATHS."""
    return {"path": "prefill", "gemm": "mma"} if path == "prefill-mma" else {"path": path}


def factory(backend: str, seed: int = 11) -> Callable[..., Any]:
    """`mx.fast.metal_kernel` for "metal", else the emulator under that schedule."""
    return mx.fast.metal_kernel if backend == "metal" else make_factory(backend, seed=seed)


def rel_err(got: mx.array | np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|."""
    got = np.array(mx.array(got).astype(mx.float32) if isinstance(got, mx.array) else got)
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def dequant(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """One expert's MXFP4 matrix in float64: nibble table (low nibble first) x 2^(scale - 127)."""
    nib = (w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    vals = FP4[nib].reshape(w.shape[0], -1)
    return vals * np.repeat(2.0 ** (s.astype(np.float64) - 127.0), 32, axis=-1)


def swiglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    g = np.minimum(g, LIMIT)
    return g / (1.0 + np.exp(-ALPHA * g)) * (np.clip(u, -LIMIT, LIMIT) + 1.0)


@dataclass
class Case:
    """Random MXFP4 experts, inputs and routing, with the float64 reference results."""

    x: mx.array
    indices: mx.array
    route: mx.array
    gate: tuple[mx.array, mx.array, mx.array]
    up: tuple[mx.array, mx.array, mx.array]
    down: tuple[mx.array, mx.array, mx.array]
    act: np.ndarray  # [N * k, I] swiglu(gate, up) per (token, slot) pair
    y_pairs: np.ndarray  # [N * k, H] w (W_d act + b_d)
    out: np.ndarray  # [N, H]

    def run(self, backend: str = "forward", path: str = "decode", **kw: object) -> mx.array:
        return km.moe(self.x, self.indices, self.route, self.gate, self.up, self.down,
                      LIMIT, ALPHA, kernel_factory=factory(backend), **path_args(path), **kw)


@functools.cache
def make_case(e: int, h: int, i: int, n: int, k: int = 4, dtype: str = "float32",
              seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    mxdt = getattr(mx, dtype)

    def q(out: int, inp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = rng.integers(0, 2**32, size=(e, out, inp // 8), dtype=np.uint64).astype(np.uint32)
        s = rng.integers(120, 125, size=(e, out, inp // 32)).astype(np.uint8)
        b = np.array(mx.array(rng.normal(size=(e, out)).astype(np.float32)).astype(mxdt)
                     .astype(mx.float32))
        return w, s, b

    g, u, d = q(i, h), q(i, h), q(h, i)
    x = mx.array(rng.normal(size=(n, h)).astype(np.float32)).astype(mxdt)
    idx = np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int32)
    route = rng.random((n, k)).astype(np.float32)
    xs = np.array(x.astype(mx.float32)).astype(np.float64)
    act, y = np.zeros((n * k, i)), np.zeros((n * k, h))
    pairs = np.arange(n * k)
    for ex in range(e):  # one dequantization per expert
        sel = pairs[idx.reshape(-1) == ex]
        if not sel.size:
            continue
        tok = sel // k
        a = swiglu(xs[tok] @ dequant(g[0][ex], g[1][ex]).T + g[2][ex],
                   xs[tok] @ dequant(u[0][ex], u[1][ex]).T + u[2][ex])
        act[sel] = a
        y[sel] = route.reshape(-1)[sel, None] * (a @ dequant(d[0][ex], d[1][ex]).T + d[2][ex])

    def qmx(t: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[mx.array, ...]:
        return mx.array(t[0]), mx.array(t[1]), mx.array(t[2]).astype(mxdt)

    return Case(x, mx.array(idx), mx.array(route), qmx(g), qmx(u), qmx(d), act, y,
                y.reshape(n, k, h).sum(1))


REAL = dict(e=4, h=2880, i=2880, n=5)  # the released hidden/intermediate sizes; 20 pairs
SMALL = dict(e=8, h=64, i=96, n=37)  # 148 pairs: 5 row tiles, the last partial


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["real", "small"])
def test_gate_up_kernels_match_numpy(shape: str, backend: str) -> None:
    case = make_case(**(REAL if shape == "real" else SMALL))
    kf = factory(backend, seed=5)
    params = mx.array([LIMIT, ALPHA], dtype=mx.float32)
    k = case.indices.shape[1]
    act = km.decode_gate_up(case.x, case.indices, case.gate, case.up, params, kf)
    assert rel_err(act, case.act) <= 1e-5
    order, sorted_experts = km.sort_pairs(case.indices)
    # Emulated MMAs are slow: at the real dims the MMA GEMMs run under the random schedule (and
    # on the GPU); the small shape runs them under every schedule.
    real_slow = shape == "real" and backend in ("forward", "reverse")
    for gemm in ["fma"] if real_slow else km.GEMMS:
        act = km.prefill_gate_up(case.x, order, sorted_experts, k, case.gate, case.up, params, kf,
                                 gemm)
        assert rel_err(act, case.act[np.array(order)]) <= 1e-5, gemm
        y_pairs = km.prefill_down(act, order, sorted_experts, case.route, case.down, kf, gemm)
        assert rel_err(y_pairs, case.y_pairs) <= 1e-5, gemm


# At the real dims the MMA GEMMs are checked kernel by kernel in test_gate_up_kernels_match_numpy
# and end to end in bfloat16 (emulated MMAs are slow); here the small shape covers them.
SHAPE_PATHS = [(shape, path) for shape in ("real", "small") for path in PATHS
               if (shape, path) != ("real", "prefill-mma")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "path"), SHAPE_PATHS)
def test_moe_matches_numpy_float32(shape: str, path: str, backend: str) -> None:
    case = make_case(**(REAL if shape == "real" else SMALL))
    out = case.run(backend, path)
    assert out.dtype == mx.float32 and out.shape == case.out.shape
    assert rel_err(out, case.out) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("dtype", "tol"), [("bfloat16", 1e-2), ("float16", 2e-3)])
def test_moe_half_precision_activations(dtype: str, tol: float, path: str, backend: str) -> None:
    case = make_case(**SMALL, dtype=dtype)
    out = case.run(backend, path)
    assert out.dtype == getattr(mx, dtype)
    assert rel_err(out, case.out) <= tol  # output rounding (2^-8 bf16, 2^-11 fp16) dominates


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [1, 4], ids=["top1", "all-experts"])
def test_moe_top1_and_all_experts(k: int, path: str) -> None:
    """The routing extremes a config allows: one expert per token, and every expert."""
    case = make_case(e=4, h=64, i=96, n=37, k=k)
    assert rel_err(case.run("random", path), case.out) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_partial_simdgroup_rows_and_threadgroups(backend: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # 5 rows per SIMD group: 96 units -> 20 SIMD groups (the last one has a single valid unit)
    # -> 640 threads = 2.5 threadgroups; 64 output rows -> 13 SIMD groups, the last with 4 rows.
    monkeypatch.setattr(km, "ROWS_PER_SIMDGROUP", 5)
    case = make_case(**SMALL)
    assert rel_err(case.run(backend, "decode"), case.out) <= 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_moe_bfloat16_real_dims(path: str) -> None:
    case = make_case(**REAL, dtype="bfloat16")
    assert rel_err(case.run("random", path), case.out) <= 1e-2


@pytest.mark.parametrize("path", PATHS)
def test_residual_is_added(path: str) -> None:
    case = make_case(**SMALL)
    res = mx.array(np.random.default_rng(3).normal(size=case.out.shape).astype(np.float32))
    assert rel_err(case.run("reverse", path, residual=res), case.out + np.array(res)) <= 1e-5


def test_auto_path_and_uint32_indices() -> None:
    case = make_case(e=8, h=64, i=96, n=3)
    out = km.moe(case.x, case.indices.astype(mx.uint32), case.route, case.gate, case.up,
                 case.down, kernel_factory=factory("random", seed=2))
    assert rel_err(out, case.out) <= 1e-5


def test_fp4_register_decode_matches_the_e2m1_table() -> None:
    """Every byte value in every byte position of a word, through the header's bit decode."""
    from gptoss_mlx.metal import source

    body = """
    const uint t = thread_position_in_grid.x;
    const float2 v = fp4_pair(words[t], t % 4u);
    out[2u * t] = v.x;
    out[2u * t + 1u] = v.y;
"""
    byte = np.repeat(np.arange(256, dtype=np.uint32), 4)
    pos = np.tile(np.arange(4, dtype=np.uint32), 256)
    noise = np.random.default_rng(0).integers(0, 2**32, size=byte.size, dtype=np.uint64)
    words = ((noise.astype(np.uint32) & ~(np.uint32(0xFF) << (8 * pos))) | (byte << (8 * pos)))
    k = make_factory()("fp4", ["words"], ["out"], body, header=source("mxfp4"))
    out = np.array(k(inputs=[mx.array(words.astype(np.uint32))], output_shapes=[(2 * byte.size,)],
                     output_dtypes=[mx.float32], grid=(byte.size, 1, 1),
                     threadgroup=(256, 1, 1))[0])
    want = np.stack([FP4[byte & 0xF], FP4[byte >> 4]], axis=1).ravel()
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(np.signbit(out), np.signbit(want))  # -0.0 stays negative


def gather_qmm_moe(case: Case) -> mx.array:
    """The same layer on MLX's own MXFP4 kernels (the second oracle)."""
    def qmm(x: mx.array, w: tuple[mx.array, ...]) -> mx.array:
        y = mx.gather_qmm(x, w[0], w[1], None, rhs_indices=case.indices, transpose=True,
                          group_size=32, bits=4, mode="mxfp4")
        return y + mx.expand_dims(w[2][case.indices], -2)

    xs = mx.expand_dims(case.x, (-2, -3))
    g, u = mx.minimum(qmm(xs, case.gate), LIMIT), mx.clip(qmm(xs, case.up), -LIMIT, LIMIT)
    y = qmm(g * mx.sigmoid(ALPHA * g) * (u + 1.0), case.down).squeeze(-2)
    return (y * mx.expand_dims(case.route, -1)).sum(-2)


@pytest.mark.parametrize(("shape", "path"), SHAPE_PATHS)
def test_moe_matches_mlx_gather_qmm(shape: str, path: str) -> None:
    case = make_case(**(REAL if shape == "real" else SMALL))
    want = np.array(gather_qmm_moe(case)).astype(np.float64)
    assert rel_err(case.out, want) <= 1e-5  # the two oracles agree with each other
    assert rel_err(case.run("forward", path), want) <= 1e-5


# Each mutation: (file it edits, exact text, replacement, paths it affects).
MUTATIONS = {
    "nibble order": ("mxfp4", "(b & 0xFu) | ((b & 0xF0u) << 12)", "(b >> 4) | ((b & 0xFu) << 16)",
                     PATHS),
    "fp4 sign bit": ("mxfp4", " | ((n & 0x00080008u) << 12)", "", PATHS),
    "fp4 exponent position": ("mxfp4", "((n & 0x00070007u) << 9)", "((n & 0x00070007u) << 10)",
                              PATHS),
    "scale exponent": ("mxfp4", "as_type<float>(s << 23)", "as_type<float>((s + 1u) << 23)",
                       PATHS),
    "swiglu clamp": ("mxfp4", "g = metal::min(g, limit);", "", PATHS),
    "removed barrier (gate_up tiles staged)": (
        "moe_gate_up_gemm",
        "metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // tiles staged", "",
        ["prefill"]),
    "removed barrier (down tiles consumed)": (
        "moe_down_gemm",
        "metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // tiles consumed", "",
        ["prefill"]),
    "removed barrier (mma gate_up tiles staged)": (
        "moe_gate_up_mma",
        "metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // tiles staged", "",
        ["prefill-mma"]),
    "removed barrier (mma down tiles consumed)": (
        "moe_down_mma",
        "metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // tiles consumed", "",
        ["prefill-mma"]),
    "removed barrier (mma gate_up sums stored)": (
        "moe_gate_up_mma",
        "metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // sums stored", "",
        ["prefill-mma"]),
    "mma weights not transposed": (
        "moe_down_mma", "simdgroup_load(w, &dt[c0 + 8u * c][kk], 36, ulong2(0, 0), true);",
        "simdgroup_load(w, &dt[c0 + 8u * c][kk], 36, ulong2(0, 0), false);", ["prefill-mma"]),
    "mma rows outside the expert segment not zeroed": (
        "moe_gate_up_mma", "float(x[ulong(token) * uint(H) + b * 32u + tn + i]) : 0.0f;",
        "float(x[ulong(token) * uint(H) + b * 32u + tn + i]) : 1.0f;", ["prefill-mma"]),
}


def mutated_factory(backend: str, target: str, old: str, new: str) -> Callable[..., Any]:
    """A kernel factory that applies one text mutation to metal/<target>.metal."""
    from gptoss_mlx.metal import source

    base = factory(backend, seed=13)
    text = source(target)

    def mutated(name: str, input_names: list[str], output_names: list[str], source: str,
                header: str = "", **kw: Any) -> Any:
        if text in (source, header):
            source, header = source.replace(old, new), header.replace(old, new)
        return base(name, input_names, output_names, source, header, **kw)

    return mutated


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mutated_kernels_fail(mutation: str) -> None:
    from gptoss_mlx.metal import source

    target, old, new, paths = MUTATIONS[mutation]
    assert source(target).count(old) == 1, "the mutation must apply to the kernel text"
    case = make_case(**SMALL)
    for path in paths:
        caught = []
        for backend in BACKENDS:
            try:
                out = km.moe(case.x, case.indices, case.route, case.gate, case.up, case.down,
                             kernel_factory=mutated_factory(backend, target, old, new),
                             **path_args(path))
                caught.append(not rel_err(out, case.out) <= 1e-5)  # NaN counts as caught
            except EmulatorError:
                caught.append(True)
        assert any(caught), f"{mutation} not caught on the {path} path"


def test_asan_build_runs_kernels_and_catches_bad_expert_ids() -> None:
    case = make_case(e=8, h=64, i=96, n=9)
    asan = make_factory("random", seed=1, asan=True)
    for path in PATHS:
        out = km.moe(case.x, case.indices, case.route, case.gate, case.up, case.down,
                     kernel_factory=asan, **path_args(path))
        assert rel_err(out, case.out) <= 1e-5
    bad = mx.array(np.where(np.arange(case.indices.size).reshape(case.indices.shape) == 5, 8,
                            np.array(case.indices)).astype(np.int32))  # expert 8 of 8
    with pytest.raises(EmulatorError, match="heap-buffer-overflow"):
        km.moe(case.x, bad, case.route, case.gate, case.up, case.down, path="decode",
               kernel_factory=asan)


@pytest.mark.parametrize(("path", "n"), [("decode", 2), ("prefill", 9), ("prefill-mma", 9)])
def test_kernels_are_race_free_under_thread_sanitizer(path: str, n: int) -> None:
    # One OS thread per GPU thread: few tokens keep it quick (prefill: 36 pairs = two row tiles,
    # the second partial).
    case = make_case(e=8, h=64, i=96, n=n)
    out = km.moe(case.x, case.indices, case.route, case.gate, case.up, case.down,
                 kernel_factory=make_factory(tsan=True), **path_args(path))
    assert rel_err(out, case.out) <= 1e-5


def test_signatures_equal_mlx_for_every_kernel(tmp_path) -> None:
    calls = []
    base = make_factory()

    def recording(*args: Any, **kw: Any) -> Callable[..., list[mx.array]]:
        kern = base(*args, **kw)

        def call(**ckw: Any) -> list[mx.array]:
            calls.append((kern, ckw))
            return kern(**ckw)

        return call

    case = make_case(**SMALL)
    for path in PATHS:
        km.moe(case.x, case.indices, case.route, case.gate, case.up, case.down,
               kernel_factory=recording, **path_args(path))
        km.moe(case.x.astype(mx.bfloat16), case.indices, case.route, case.gate, case.up,
               case.down, residual=case.x.astype(mx.bfloat16), kernel_factory=recording,
               **path_args(path))
    assert {kern.name for kern, _ in calls} == {f"gptoss_{name}" for name in km.KERNELS}
    for n, (kern, ckw) in enumerate(calls):
        inputs, template = ckw["inputs"], ckw["template"]
        want = mlx_generated_source(kern, inputs, ckw["output_shapes"], ckw["output_dtypes"],
                                    template, str(tmp_path / f"{n}.mlxfn"))
        specs = [(tuple(a.shape), a.dtype) for a in inputs]
        assert kern.mlx_source(specs, ckw["output_dtypes"], template) == want, kern.name


def test_bad_shapes_raise_one_clear_error() -> None:
    case = make_case(e=8, h=64, i=96, n=3)
    with pytest.raises(ValueError, match=r"moe: down weights must be"):
        km.moe(case.x, case.indices, case.route, case.gate, case.up, case.gate)
    with pytest.raises(ValueError, match=r"moe: indices must be int32/uint32"):
        km.moe(case.x, case.indices.astype(mx.float32), case.route, case.gate, case.up,
               case.down)
