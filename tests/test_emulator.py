"""The MSL emulator itself: scheduling, threadgroup memory, collectives, bfloat rounding, error
reports, AddressSanitizer mode, and the signature it generates against MLX's own."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from msl_emulator import EmulatorError, make_factory, mlx_generated_source

pytestmark = pytest.mark.skipif(shutil.which("g++") is None,
                                reason="the MSL emulator needs g++")
SCHEDULES = ["forward", "reverse", "random"]

ROWSUM = """
    threadgroup float partial[8];
    uint tid = thread_index_in_threadgroup;
    uint row = threadgroup_position_in_grid.x;
    uint width = uint(x_shape[1]);
    float acc = 0.0f;
    for (uint j = tid; j < width; j += threads_per_threadgroup.x) {
        acc += float(x[row * width + j]);
    }
    acc = metal::simd_sum(acc);
    if (thread_index_in_simdgroup == 0) {
        partial[simdgroup_index_in_threadgroup] = acc;
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    if (tid == 0) {
        float s = 0.0f;
        for (uint i = 0; i < simdgroups_per_threadgroup; ++i) {
            s += partial[i];
        }
        out[row] = T(s);
    }
"""


def rowsum(source: str, x: mx.array, schedule: str = "forward", asan: bool = False,
           threads: int = 200, tsan: bool = False) -> np.ndarray:
    k = make_factory(schedule, seed=7, asan=asan, tsan=tsan)("rowsum", ["x"], ["out"], source)
    rows = x.shape[0]
    out = k(inputs=[x], output_shapes=[(rows,)], output_dtypes=[mx.float32],
            grid=(rows * threads, 1, 1), threadgroup=(threads, 1, 1),
            template=[("T", mx.float32)])[0]
    return np.array(out)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_threadgroup_reduction_matches_numpy(schedule: str) -> None:
    x = mx.random.normal((5, 1000), key=mx.random.key(0))
    np.testing.assert_allclose(rowsum(ROWSUM, x, schedule), np.array(x).sum(1), rtol=1e-5,
                               atol=1e-4)


def test_missing_barrier_shows_under_some_schedule() -> None:
    x = mx.random.normal((5, 1000), key=mx.random.key(1))
    broken = ROWSUM.replace("metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);", "")
    want = np.array(x).sum(1)
    wrong = [not np.allclose(rowsum(broken, x, s), want, rtol=1e-4, atol=1e-3) for s in SCHEDULES]
    assert any(wrong)
    # Thread 0 runs first under the forward order and reads the NaN poison of unwritten slots.
    assert np.isnan(rowsum(broken, x, "forward")).all()


def test_barrier_divergence_reports_line() -> None:
    x = mx.random.normal((2, 64), key=mx.random.key(2))
    body = ROWSUM.replace(
        "if (tid == 0) {",
        "if (tid == 0) {\n metal::threadgroup_barrier(metal::mem_flags::mem_none);")
    line = body.split("\n").index(" metal::threadgroup_barrier(metal::mem_flags::mem_none);") + 1
    with pytest.raises(EmulatorError, match=f"barrier divergence.*line {line}.*returned"):
        rowsum(body, x, threads=64)


def test_divergent_collective_reports_line() -> None:
    body = """
    float v = float(x[thread_position_in_grid.x]);
    if (thread_index_in_simdgroup < 16) {
        v = metal::simd_sum(v);
    } else {
        metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    }
    out[thread_position_in_grid.x] = v;
"""
    k = make_factory()("divergent", ["x"], ["out"], body)
    with pytest.raises(EmulatorError, match="SIMD collective at line 4 in a divergent branch"):
        k(inputs=[mx.zeros((32,))], output_shapes=[(32,)], output_dtypes=[mx.float32],
          grid=(32, 1, 1), threadgroup=(32, 1, 1))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_simd_shuffles_and_partial_simdgroups(schedule: str) -> None:
    body = """
    uint i = thread_position_in_grid.x;
    uint lane = thread_index_in_simdgroup;
    float v = x[i];
    out[i * 5 + 0] = metal::simd_shuffle_down(v, 3);
    out[i * 5 + 1] = metal::simd_shuffle(v, (lane + 5) % 32);
    out[i * 5 + 2] = metal::simd_broadcast(v, 2);
    out[i * 5 + 3] = metal::simd_max(v);
    out[i * 5 + 4] = metal::simd_shuffle_xor(v, 1);
"""
    n, tg = 100, 48  # threadgroups of 48 threads: SIMD groups of 32 and 16; the last group has 4
    x = np.random.default_rng(0).normal(size=n).astype(np.float32)
    k = make_factory(schedule, seed=3)("shuffles", ["x"], ["out"], body)
    out = np.array(k(inputs=[mx.array(x)], output_shapes=[(n * 5,)], output_dtypes=[mx.float32],
                     grid=(n, 1, 1), threadgroup=(tg, 1, 1))[0]).reshape(n, 5)
    for i in range(n):
        start = (i // tg) * tg + ((i % tg) // 32) * 32
        size = min(32, n - start, (i // tg) * tg + tg - start)
        lane, sg = i - start, x[start:start + size]

        def at(src: int, sg: np.ndarray = sg, size: int = size) -> float:
            return sg[src] if src < size else np.nan  # inactive lanes read as NaN poison

        np.testing.assert_equal(out[i, 0], at(lane + 3) if lane + 3 < 32 else sg[lane])
        np.testing.assert_equal(out[i, 1], at((lane + 5) % 32))
        np.testing.assert_equal(out[i, 2], at(2))
        np.testing.assert_equal(out[i, 3], sg.max())
        np.testing.assert_equal(out[i, 4], at(lane ^ 1))


def test_bfloat_round_to_nearest_even_matches_mlx() -> None:
    body = """
    uint i = thread_position_in_grid.x;
    out[i] = bfloat16_t(x[i]);
    back[i] = float(out[i]);
"""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=2000).astype(np.float32) * 1e3,
                        np.array([1.00390625, 1.01171875, -2.00390625, np.inf, -np.inf, 0.0],
                                 np.float32)])
    k = make_factory()("tobf16", ["x"], ["out", "back"], body)
    out, back = k(inputs=[mx.array(x)], output_shapes=[x.shape, x.shape],
                  output_dtypes=[mx.bfloat16, mx.float32], grid=(x.size, 1, 1),
                  threadgroup=(256, 1, 1))
    want = mx.array(x).astype(mx.bfloat16)
    assert np.array_equal(np.array(out.view(mx.uint16)), np.array(want.view(mx.uint16)))
    np.testing.assert_array_equal(np.array(back), np.array(want.astype(mx.float32)))


def test_asan_mode_runs_and_catches_out_of_bounds() -> None:
    x = mx.random.normal((3, 300), key=mx.random.key(3))
    np.testing.assert_allclose(rowsum(ROWSUM, x, "random", asan=True), np.array(x).sum(1),
                               rtol=1e-5, atol=1e-4)
    overrun = ROWSUM.replace("x[row * width + j]", "x[row * width + j + 1]")
    with pytest.raises(EmulatorError, match="heap-buffer-overflow"):
        rowsum(overrun, x, asan=True)


def test_tsan_mode_names_the_racing_line() -> None:
    x = mx.random.normal((2, 300), key=mx.random.key(4))
    np.testing.assert_allclose(rowsum(ROWSUM, x, tsan=True, threads=64), np.array(x).sum(1),
                               rtol=1e-5, atol=1e-4)
    broken = ROWSUM.replace("metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);", "")
    lines = ROWSUM.split("\n")
    write = lines.index("        partial[simdgroup_index_in_threadgroup] = acc;") + 1
    read = lines.index("            s += partial[i];") + 1
    with pytest.raises(EmulatorError,  # either access of the racing pair, whichever came second
                       match=f"SUMMARY: ThreadSanitizer: data race .*rowsum:({write}|{read}) "):
        rowsum(broken, x, tsan=True, threads=64)


def test_init_value_and_poisoned_outputs() -> None:
    body = "if (thread_position_in_grid.x % 2 == 0) { out[thread_position_in_grid.x] = 1.0f; }"
    k = make_factory()("half_written", ["x"], ["out"], body)
    call = dict(inputs=[mx.zeros((8,))], output_shapes=[(8,)], output_dtypes=[mx.float32],
                grid=(8, 1, 1), threadgroup=(8, 1, 1))
    assert np.isnan(np.array(k(**call)[0])[1::2]).all()
    np.testing.assert_array_equal(np.array(k(**call, init_value=3.0)[0]), [1, 3] * 4)


def test_generated_signature_equals_mlx(tmp_path) -> None:
    body = """
    uint i = thread_position_in_grid.x + threads_per_simdgroup * 0;
    out[i] = T(a[i] * N) + float(b) + c_shape[0] + c_strides[0] + c_ndim
             + float(thread_index_in_simdgroup) + float(threadgroup_position_in_grid.x);
    flag[i] = B;
"""
    k = make_factory()("sig", ["a", "b", "c"], ["out", "flag"], body, header="// helpers\n")
    inputs = [mx.zeros((64,)), mx.array(2.0, dtype=mx.bfloat16), mx.zeros((2, 3), dtype=mx.uint8)]
    shapes, dtypes = [(64,), (64,)], [mx.float32, mx.bool_]
    template = [("T", mx.float32), ("N", -3), ("B", True)]
    want = mlx_generated_source(k, inputs, shapes, dtypes, template, str(tmp_path / "k.mlxfn"))
    specs = [(tuple(a.shape), a.dtype) for a in inputs]
    assert k.mlx_source(specs, dtypes, template) == want
    # ... and the emulator runs that same kernel.
    out, flag = k(inputs=inputs, output_shapes=shapes, output_dtypes=dtypes, grid=(64, 1, 1),
                  threadgroup=(32, 1, 1), template=template)
    lane_and_group = np.arange(64) % 32 + np.arange(64) // 32
    # b + c_shape[0] + c_strides[0] + c_ndim = 2 + 2 + 3 + 2
    np.testing.assert_array_equal(np.array(out), 9.0 + lane_and_group)
    assert np.array(flag).all()


def test_vector_types_as_type_and_math_builtins() -> None:
    body = """
    uint i = thread_position_in_grid.x;
    const device uint4* w4 = (const device uint4*)(w);
    uint4 v = w4[i];
    float4 f = float4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
    float4 g = f * 2.0f + float4(1.0f);
    out[8 * i + 0] = as_type<float>(v.x);
    out[8 * i + 1] = float(v[3] >> 28);
    out[8 * i + 2] = metal::dot(f, g);
    out[8 * i + 3] = metal::clamp(f.y, -0.5f, 0.5f);
    out[8 * i + 4] = metal::precise::exp(f.z);
    out[8 * i + 5] = metal::rsqrt(metal::abs(f.w) + 1.0f);
    out[8 * i + 6] = float(half(f.x));
    out[8 * i + 7] = metal::max(metal::min(f.x, f.y), metal::select(f.z, f.w, f.w > f.z));
"""
    n = 16
    rng = np.random.default_rng(2)
    x = rng.normal(size=4 * n).astype(np.float32)
    w = rng.integers(0, 2**32, size=4 * n, dtype=np.uint64).astype(np.uint32)
    k = make_factory()("builtins", ["x", "w"], ["out"], body)
    out = np.array(k(inputs=[mx.array(x), mx.array(w)], output_shapes=[(8 * n,)],
                     output_dtypes=[mx.float32], grid=(n, 1, 1), threadgroup=(8, 1, 1))[0])
    out = out.reshape(n, 8)
    f, v = x.reshape(n, 4), w.reshape(n, 4)
    np.testing.assert_array_equal(out[:, 0].view(np.uint32), v[:, 0])
    np.testing.assert_array_equal(out[:, 1], v[:, 3] >> 28)
    np.testing.assert_allclose(out[:, 2], (f * (2 * f + 1)).sum(1), rtol=1e-6)
    np.testing.assert_array_equal(out[:, 3], np.clip(f[:, 1], -0.5, 0.5))
    np.testing.assert_allclose(out[:, 4], np.exp(f[:, 2]), rtol=1e-6)
    np.testing.assert_allclose(out[:, 5], 1 / np.sqrt(np.abs(f[:, 3]) + 1), rtol=1e-6)
    np.testing.assert_array_equal(out[:, 6], f[:, 0].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(out[:, 7], np.maximum(np.minimum(f[:, 0], f[:, 1]),
                                                        np.maximum(f[:, 2], f[:, 3])))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_simdgroup_barrier_orders_threadgroup_memory(schedule: str) -> None:
    body = """
    threadgroup float buf[64];
    uint t = thread_index_in_threadgroup;
    buf[t] = x[thread_position_in_grid.x];
    metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);
    out[thread_position_in_grid.x] = buf[(t / 32) * 32 + (t % 32 + 1) % 32];
"""
    x = np.arange(128, dtype=np.float32)
    want = x.reshape(-1, 32)[:, (np.arange(32) + 1) % 32].ravel()

    def run(text: str) -> np.ndarray:
        k = make_factory(schedule, seed=9)("rotate", ["x"], ["out"], text)
        return np.array(k(inputs=[mx.array(x)], output_shapes=[(128,)],
                          output_dtypes=[mx.float32], grid=(128, 1, 1),
                          threadgroup=(64, 1, 1))[0])

    np.testing.assert_array_equal(run(body), want)
    broken = run(body.replace("metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);", ""))
    if schedule == "forward":  # lane 0 reads lane 1's slot before lane 1 ran: NaN poison
        assert np.isnan(broken).any()


def test_compile_errors_name_the_kernel_line() -> None:
    body = "uint i = thread_position_in_grid.x;\nout[i] = undefined_name;\n"
    k = make_factory()("typo", ["x"], ["out"], body)
    with pytest.raises(EmulatorError,
                       match=r"g\+\+ failed(.|\n)*typo:2:\d+: error: .undefined_name"):
        k(inputs=[mx.zeros((8,))], output_shapes=[(8,)], output_dtypes=[mx.float32],
          grid=(8, 1, 1), threadgroup=(8, 1, 1))


MATMUL = """
    const uint sg = simdgroup_index_in_threadgroup;  // one 8x8 block of the 16x16 result each
    const uint bi = sg / 2u, bj = sg % 2u;
    simdgroup_matrix<T, 8, 8> acc = make_filled_simdgroup_matrix<T, 8, 8>(T(0));
    for (uint k = 0; k < 16u; k += 8u) {
        simdgroup_matrix<T, 8, 8> a;
        simdgroup_matrix<T, 8, 8> b;
        simdgroup_load(a, a_in + 8u * bi * 16u + k, 16);
        simdgroup_load(b, bt_in + 8u * bj * 16u + k, 16, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(acc, a, b, acc);
    }
    simdgroup_store(acc, out + 8u * bi * 16u + 8u * bj, 16);
    simdgroup_store(acc, out_t + 8u * bj * 16u + 8u * bi, 16, ulong2(0, 0), true);
"""


def matmul(body: str, dtype: mx.Dtype, schedule: str = "forward", threads: int = 128,
           **kw: object) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    a, bt = (rng.normal(size=(16, 16)).astype(np.float32) for _ in range(2))
    a, bt = (np.array(mx.array(m).astype(dtype).astype(mx.float32)) for m in (a, bt))
    k = make_factory(schedule, seed=5, **kw)("mma", ["a_in", "bt_in"], ["out", "out_t"], body)
    out, out_t = k(inputs=[mx.array(a).astype(dtype), mx.array(bt).astype(dtype)],
                   output_shapes=[(16, 16), (16, 16)], output_dtypes=[dtype, dtype],
                   grid=(threads, 1, 1), threadgroup=(threads, 1, 1), template=[("T", dtype)])
    return (np.array(out.astype(mx.float32)), np.array(out_t.astype(mx.float32)),
            a.astype(np.float64), bt.astype(np.float64))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("dtype", "tol"), [(mx.float32, 1e-6), (mx.float16, 2e-3),
                                            (mx.bfloat16, 1e-2)])
def test_simdgroup_matrix_load_multiply_store(schedule: str, dtype: mx.Dtype, tol: float) -> None:
    out, out_t, a, bt = matmul(MATMUL, dtype, schedule)
    want = a @ bt.T
    assert np.abs(out - want).max() <= tol * np.abs(want).max()
    np.testing.assert_array_equal(out_t, out.T)


def test_simdgroup_matrix_race_free_under_thread_sanitizer() -> None:
    out, _, a, bt = matmul(MATMUL, mx.float32, tsan=True)
    np.testing.assert_allclose(out, a @ bt.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("edit", "threads", "message"), [
    (("simdgroup_load(a,", "if (thread_index_in_simdgroup < 31u) simdgroup_load(a,"), 128,
     "simdgroup_matrix operations differ between the lanes of a SIMD group .a divergent branch "
     "or per-lane arguments., at or before line 10"),
    (("simdgroup_load(a, a_in + 8u * bi * 16u + k, 16);",
      "simdgroup_load(a, a_in + 8u * bi * 16u + k, 16 + thread_index_in_simdgroup % 2u);"), 128,
     "simdgroup_matrix operations differ between the lanes of a SIMD group"),
    (("ulong2(0, 0), true);\n        simdgroup_multiply",
      "ulong2(1, 0), true);\n        simdgroup_multiply"), 128,
     "simdgroup_load with a matrix_origin: not emulated"),
    # 112 threads: SIMD groups of 32, 32, 32 and 16 lanes
    (("", ""), 112, "simdgroup_matrix operation with inactive lanes in the SIMD group at line 8"),
])
def test_simdgroup_matrix_misuse_is_reported(edit: tuple[str, str], threads: int,
                                             message: str) -> None:
    assert edit[0] in MATMUL
    with pytest.raises(EmulatorError, match=message):
        matmul(MATMUL.replace(*edit), mx.float32, threads=threads)


def test_uninitialized_simdgroup_matrix_is_poison() -> None:
    body = MATMUL.replace(" = make_filled_simdgroup_matrix<T, 8, 8>(T(0))", "")
    assert body != MATMUL
    out, _, _, _ = matmul(body, mx.float32)
    assert np.isnan(out).all()
