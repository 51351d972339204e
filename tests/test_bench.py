"""Bytes per token against the reference figures, the harness's bookkeeping, and the CLI table."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from gptoss_mlx.bench import (
    ConstraintCost,
    Measurement,
    Result,
    Test,
    bytes_per_token,
    chip_bandwidth,
    device_bandwidth,
    llama_bench_tests,
    ratios,
    run_tests,
)
from gptoss_mlx.cli import main
from gptoss_mlx.config import ModelConfig
from gptoss_mlx.convert.layout import mlx_specs
from gptoss_mlx.convert.safetensors_io import TensorSpec
from gptoss_mlx.convert.synthetic import preset_config
from gptoss_mlx.memory import tensor_part

GB = 1e9
DENSE_PARTS = ("attention", "router", "embedding", "lm_head")  # what --dense-bits quantizes


def specs_of(preset: str) -> tuple[ModelConfig, list[TensorSpec]]:
    cfg = ModelConfig.from_dict(preset_config(preset))
    return cfg, mlx_specs(cfg)


def eight_bit_dense(
    specs: list[TensorSpec], parts: tuple[str, ...] = DENSE_PARTS
) -> list[TensorSpec]:
    """The tensors after affine 8-bit quantization (group 64) of the 2-D weights of `parts`, in
    the layout `mx.quantize` produces (checked in `test_affine_layout_is_mlx_quantize`)."""
    out = []
    for s in specs:
        if tensor_part(s.name) in parts and s.name.endswith(".weight") and len(s.shape) == 2:
            rows, cols = s.shape
            stem = s.name.rsplit(".", 1)[0]
            out += [TensorSpec(s.name, "U32", (rows, cols // 4)),
                    TensorSpec(stem + ".scales", "BF16", (rows, cols // 64)),
                    TensorSpec(stem + ".biases", "BF16", (rows, cols // 64))]
        else:
            out.append(s)
    return out


def test_affine_layout_is_mlx_quantize() -> None:
    w = mx.random.normal((8, 256)).astype(mx.bfloat16)
    q, scales, biases = mx.quantize(w, group_size=64, bits=8)
    assert (q.dtype, q.shape) == (mx.uint32, (8, 64))
    assert (scales.dtype, scales.shape) == (mx.bfloat16, (8, 4))
    assert (biases.dtype, biases.shape) == (mx.bfloat16, (8, 4))


@pytest.mark.parametrize(
    "preset,bf16,eight_bit", [("20b", 3.71, 2.57), ("120b", 5.00, 3.56)]
)
def test_bytes_per_token_match_the_reference(preset: str, bf16: float, eight_bit: float) -> None:
    cfg, specs = specs_of(preset)
    lossless = bytes_per_token(cfg, specs)
    # Reference section 5: 20b 3.71 GB (2.57 GB with 8-bit attention and lm_head);
    # 120b 5.00 GB (3.56 GB).
    assert sum(lossless.values()) / GB == pytest.approx(bf16, abs=0.006)
    quant = bytes_per_token(cfg, eight_bit_dense(specs, ("attention", "lm_head")))
    assert sum(quant.values()) / GB == pytest.approx(eight_bit, abs=0.006)
    # --dense-bits 8 also quantizes the router (and the embedding, one row of it per token)
    dense = bytes_per_token(cfg, eight_bit_dense(specs))
    assert 0 < sum(quant.values()) - sum(dense.values()) < quant["router"]
    print(f"{preset}: {sum(lossless.values()) / GB:.3f} GB per token lossless, "
          f"{sum(dense.values()) / GB:.3f} GB with 8-bit dense weights")


def test_20b_parts_and_kv_at_depth() -> None:
    cfg, specs = specs_of("20b")
    b = bytes_per_token(cfg, specs)
    assert b["experts"] / GB == pytest.approx(4 * 13.24e6 * 24 / GB, rel=2e-3)
    assert b["attention"] / GB == pytest.approx(1.27, abs=0.005)
    assert b["lm_head"] / GB == pytest.approx(1.16, abs=0.005)
    deep = bytes_per_token(cfg, specs, depth=4096)
    # 2048 B per token per layer: 12 full layers read 4096 + 1 positions, 12 sliding ones 128
    assert deep["kv cache"] == 2048 * (12 * 4097 + 12 * 128)


def test_chip_bandwidth_table() -> None:
    # Reference section 5.
    assert chip_bandwidth("Apple M2 Pro") == 200
    assert chip_bandwidth("Apple M4 Pro") == 273
    assert chip_bandwidth("Apple M2 Max") == 400
    assert chip_bandwidth("Apple M4 Max") == 546
    assert chip_bandwidth("Apple M2 Ultra") == 800
    assert chip_bandwidth("Intel(R) Xeon(R) Processor") is None
    name, bw = device_bandwidth()
    assert name == mx.device_info()["device_name"]
    if not mx.metal.is_available():
        assert bw is None


def test_llama_bench_matrix() -> None:
    names = [t.name for t in llama_bench_tests([512, 2048], [128], [4096])]
    assert names == ["pp512", "pp2048", "tg128", "tg128 @ d4096"]


class Recorder:
    """A runtime that yields its tokens at once and logs what it was asked."""

    def __init__(self, name: str, log: list[tuple[str, int, int]]):
        self.name, self.log = name, log

    def generate(self, prompt: list[int], max_tokens: int) -> Iterator[int]:
        self.log.append((self.name, len(prompt), max_tokens))
        yield from range(max_tokens)


def test_runs_interleave_in_rotating_order() -> None:
    log: list[tuple[str, int, int]] = []
    a, b = Recorder("a", log), Recorder("b", log)
    tests = [Test(n_prompt=16), Test(n_gen=4, depth=32)]
    results = run_tests([a, b], tests, repetitions=2, warmup=False)
    assert [name for name, _, _ in log] == ["a", "b", "a", "b", "b", "a", "b", "a"]
    # pp16: a 16-token prompt and one token; tg4 @ d32: a 32-token prompt and 4 + 1 tokens
    assert {(n, m) for _, n, m in log} == {(16, 1), (32, 5)}
    assert all(len(r.runs) == 2 for r in results)


def test_ratios_are_medians_of_paired_runs() -> None:
    t, pp = Test(n_gen=8), Test(n_prompt=8)
    ours = Result("ours", t, [Measurement(x, 0.1, 0, h) for x, h in ((10, 1), (30, 2), (20, 3))])
    theirs = Result("theirs", t, [Measurement(x, 0.1, 0, 4) for x in (10, 10, 40)])
    pp_ours = Result("ours", pp, [Measurement(5, 1, 0)])
    pp_theirs = Result("theirs", pp, [Measurement(10, 1, 0)])
    results = [ours, theirs, pp_ours, pp_theirs]
    assert ratios(results, "ours", "theirs") == {"tg8": 1.0, "pp8": 0.5}  # tg: median(1, 3, .5)
    assert ratios(results, "ours", "theirs", "host_per_token") == {"tg8": 0.5}


def test_constraint_cost_reports_best_median_and_paired_difference() -> None:
    cost = ConstraintCost(with_ms=[12.0, 9.0, 20.0], without_ms=[10.0, 8.5, 11.0],
                          mask_ms=[0.5, 0.25, 0.75], apply_ms=[0.25, 0.5, 0.125], tokens=64)
    assert cost.constraint_ms == [0.75, 0.75, 0.875]
    assert str(cost) == (
        "JSON schema (64 tokens, 3 runs, best | median): decode 9.00 | 12.00 ms/token with it, "
        "8.50 | 10.00 without (+2.00 ms/token, the median of the runs' differences); the "
        "constraint itself 0.750 | 0.750 ms/token: computing the mask 0.250 | 0.500 (while the "
        "forward runs), applying it 0.125 | 0.250")


def test_bench_cli_prints_the_table(tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(
        main, ["bench", "-m", str(tiny_model_dir), "-p", "16", "-n", "4", "-d", "32", "-r", "2",
               "--experts", "mlx", "--schema-tokens", "24"],
    )
    assert result.exit_code == 0, result.output + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert header == ["model", "size", "runtime", "test", "t/s", "ttft ms", "peak mem",
                      "host ms/tok", "decode BW"]
    tests = [row.split("|")[4].strip() for row in rows[2:]]
    assert tests == ["pp16", "tg4", "tg4 @ d32"]
    for row in rows[2:]:
        assert re.search(r"\d+\.\d\d ± \d+\.\d\d", row)
    if not mx.metal.is_available():
        assert rows[3].count("n/a (CPU)") == 1 and rows[4].count("n/a (CPU)") == 1
    assert "memory plan:" in result.stderr
    pair = r"\d+\.\d+ \| \d+\.\d+"  # best | median
    assert re.search(rf"JSON schema \(24 tokens, 2 runs, best \| median\): decode {pair} ms/token "
                     rf"with it, {pair} without \([+-]\d+\.\d\d ms/token, the median of the runs' "
                     rf"differences\); the constraint itself {pair} ms/token: "
                     rf"computing the mask {pair} \(while the forward runs\), applying it {pair}",
                     result.stderr)


def test_bench_cli_compares_with_mlx_lm(tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(
        main, ["bench", "-m", str(tiny_model_dir), "-p", "16", "-n", "4", "-d", "", "-r", "1",
               "--experts", "mlx", "--compare", "--schema-tokens", "0"],
    )
    assert result.exit_code == 0, result.output + result.stderr
    runtimes = [row.split("|")[3].strip() for row in result.stdout.splitlines()[2:]]
    assert runtimes == ["gptoss-mlx mlx", "mlx-lm", "gptoss-mlx mlx", "mlx-lm"]
    assert re.search(r"gptoss-mlx mlx / mlx-lm: speed pp16 \d+\.\d\dx, tg4 \d+\.\d\dx; "
                     r"host CPU per decoded token tg4 \d+\.\d\dx", result.stderr)


def test_bench_compare_needs_the_tokenizer_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "old"  # a folder converted before convert wrote tokenizer.json
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "tokenizer.json":
            (folder / f.name).symlink_to(f)
    result = CliRunner().invoke(main, ["bench", "-m", str(folder), "-p", "16", "-n", "",
                                       "--experts", "mlx", "--compare"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "no tokenizer.json for mlx-lm" in errors[0] and "convert" in errors[0]


def test_bench_cli_reports_a_plan_that_does_not_fit(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPTOSS_MLX_WORKING_SET", "1MB")
    result = CliRunner().invoke(main, ["bench", "-m", str(tiny_model_dir), "-p", "16", "-n", ""])
    assert result.exit_code == 1
    assert "GPU working set" in result.stderr and "--dense-bits 8" in result.stderr


def test_runtimes_set_their_experts_backend_on_the_shared_model(tiny_model_dir: Path) -> None:
    from gptoss_mlx import load
    from gptoss_mlx.bench import OurRuntime

    model, tokenizer = load(tiny_model_dir, experts="mlx")

    def wrong_backend(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated with the other runtime's experts backend")

    model.set_experts(wrong_backend, "other")
    runtime = OurRuntime(model, tokenizer, "gptoss-mlx mlx", experts="mlx")
    assert len(list(runtime.generate([1, 2, 3], 2))) == 2
    assert model.experts_backend == "mlx"
