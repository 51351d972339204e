"""Benchmarks: llama-bench style prefill/decode tests, bytes per token, and A/B runs side by side.

Every runtime is timed by the same harness from the outside: each generation is a stream that
yields once per token, and the harness notes when each token arrives. Time to first token is
prefill; decode speed is the tokens after the first over the time they took. Runs of different
runtimes are interleaved (the order rotating each repetition) so a noisy machine slows them alike,
and ratios are medians of per-repetition ratios.

- `bytes_per_token`: bytes decode reads per token, from the folder's tensors and the KV depth;
- `chip_bandwidth`: Apple's spec memory bandwidth by chip name; `cpu_blas`: on Linux, the BLAS
  library MLX's CPU backend calls;
- `LogitAgreement`: argmax/top-5 agreement and KL between two models' logits;
- `OurRuntime` (`gptoss_mlx.generate.stream`) and `MlxLmRuntime` (`mlx_lm.stream_generate` on the
  same folder), `run_tests`, `format_table`, `format_ratios`.
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx

from gptoss_mlx.config import ModelConfig
from gptoss_mlx.convert.safetensors_io import TensorSpec
from gptoss_mlx.memory import gb, kv_bytes_per_token, loaded_nbytes, tensor_part

# Spec memory bandwidth in GB/s (reference section 5; the base chips from Apple's spec sheets).
# Binned Max parts (M3 Max 14-core: 300, M4 Max 14-core: 410) report the same name: the figure
# is the top bin's, so a share computed from it is a lower bound.
CHIP_BANDWIDTH_GBPS: dict[str, float] = {
    "M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": 400, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": 546,
}


def chip_bandwidth(device_name: str) -> float | None:
    """Spec bandwidth (GB/s) of an Apple chip named like `"Apple M2 Max"`; None if unknown."""
    words = device_name.replace("Apple", "").split()
    for n in (2, 1):
        if len(words) >= n and " ".join(words[:n]) in CHIP_BANDWIDTH_GBPS:
            return CHIP_BANDWIDTH_GBPS[" ".join(words[:n])]
    return None


def device_bandwidth() -> tuple[str, float | None]:
    """(device name, spec GB/s); the bandwidth is None off Metal or for an unknown chip."""
    name = mx.device_info().get("device_name", "unknown")
    return name, chip_bandwidth(name) if mx.metal.is_available() else None


def cpu_blas() -> str | None:
    """On Linux, the file of the BLAS whose `cblas_sgemm` MLX's CPU backend calls: one the
    process's global scope provides (LD_PRELOAD, e.g. OpenBLAS), which the dynamic linker binds
    first, else the one libmlx brings (the mlx-cpu wheel's `mlx_cpu.libs/libblas`, netlib's
    reference BLAS). None elsewhere, or when neither is found."""
    if not sys.platform.startswith("linux"):
        return None
    maps = []  # (start, end, path) of each mapped file
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                maps.append((start, end, fields[5].strip()))
    try:  # RTLD_DEFAULT: what libmlx's reference binds to before its own dependencies
        addr = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        addr = None
    if addr is not None:
        return next((path for start, end, path in maps if start <= addr < end), None)
    return next((path for _, _, path in maps
                 if "mlx_cpu.libs" in path and Path(path).name.startswith("libblas")), None)


def bytes_per_token(
    cfg: ModelConfig, specs: Iterable[TensorSpec], depth: int = 0, dtype: str = "bfloat16"
) -> dict[str, int]:
    """Bytes one decoded token reads (batch 1), by part: the k active experts of each layer
    (weights, scales and biases), every attention/router/norm/lm_head tensor, one embedding row,
    and the KV cache at `depth` tokens already in context."""
    out: dict[str, int] = {}
    k, E = cfg.num_experts_per_tok, cfg.num_local_experts
    for s in specs:
        part = tensor_part(s.name)
        n = loaded_nbytes(s, dtype)
        if part == "experts":
            n = n // E * k
        elif part == "embedding":
            n //= s.shape[0]
        out[part] = out.get(part, 0) + n
    per_tok = kv_bytes_per_token(cfg, dtype)
    seen = depth + 1  # the cached positions plus the new one
    out["kv cache"] = per_tok * sum(
        min(seen, cfg.sliding_window) if sliding else seen for sliding in cfg.sliding_layers
    )
    return out


@dataclass(frozen=True)
class LogitAgreement:
    """How far `other`'s next-token logits are from `reference`'s at the same positions."""

    argmax: float  # share of positions with the same top token
    top5: float  # share where other's top token is among reference's top 5
    kl: float  # mean KL(reference || other) of the softmaxes, nats
    median_lead: float  # reference's median top-1 minus top-2 logit

    @classmethod
    def of(cls, reference: Any, other: Any) -> LogitAgreement:
        """From two `[positions, vocab]` arrays of logits."""
        import numpy as np

        ref, oth = (np.asarray(a, dtype=np.float64).reshape(-1, a.shape[-1])
                    for a in (reference, other))
        top = oth.argmax(-1)
        k = min(5, ref.shape[-1])
        top5 = np.argpartition(ref, -k, axis=-1)[:, -k:]
        two = np.partition(ref, -2, axis=-1)[:, -2:]
        logp, logq = (a - np.logaddexp.reduce(a, axis=-1, keepdims=True) for a in (ref, oth))
        return cls(argmax=float(np.mean(ref.argmax(-1) == top)),
                   top5=float(np.mean((top5 == top[:, None]).any(-1))),
                   kl=float(np.mean(np.sum(np.exp(logp) * (logp - logq), axis=-1))),
                   median_lead=float(np.median(two[:, 1] - two[:, 0])))

    def __str__(self) -> str:
        return (f"argmax agreement {self.argmax:.3f}, in the top 5 {self.top5:.3f}, "
                f"KL {self.kl:.2e} nats, median top-1 lead {self.median_lead:.2f}")


class Runtime(Protocol):
    """Something that generates from token ids, yielding once per generated token."""

    name: str

    def generate(self, prompt: list[int], max_tokens: int) -> Iterator[Any]: ...


class OurRuntime:
    """gptoss-mlx: `gptoss_mlx.generate.stream`, greedy, never stopping early, with the
    experts backend `experts` (None: as loaded; "auto": the one the model was loaded with,
    autotuned). Runtimes that differ only in the backend share one loaded model: each sets its
    backend before generating."""

    def __init__(self, model: Any, tokenizer: Any, name: str, experts: str | None = None):
        from gptoss_mlx.model.experts import resolve_backend

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.backend = ((model.experts_backend, model.moe_fn) if experts == "auto"
                        else resolve_backend(experts) if experts else None)

    def generate(self, prompt: list[int], max_tokens: int) -> Iterator[Any]:
        from gptoss_mlx.generate import TokenEvent, stream
        from gptoss_mlx.sampling import SamplingParams

        if self.backend is not None:
            name, fn = self.backend
            self.model.set_experts(fn, name)

        events = stream(self.model, self.tokenizer, prompt, sampling=SamplingParams(temperature=0),
                        max_tokens=max_tokens, stop_tokens=frozenset())
        return (e for e in events if isinstance(e, TokenEvent))


class MlxLmRuntime:
    """mlx-lm: `mlx_lm.stream_generate` (greedy by default) on the same folder, EOS disabled.
    The folder needs the release's tokenizer files, which `convert` puts there."""

    name = "mlx-lm"

    def __init__(self, model_dir: str | Path):
        import mlx_lm

        if not (Path(model_dir) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{model_dir}: no tokenizer.json for mlx-lm; convert the "
                                    "checkpoint again with this version of gptoss-mlx")
        self.model, self.tokenizer = mlx_lm.load(str(model_dir))
        self.tokenizer._eos_token_ids = set()  # as mlx_lm.benchmark does: never stop early

    def generate(self, prompt: list[int], max_tokens: int) -> Iterator[Any]:
        import mlx_lm

        return mlx_lm.stream_generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens)


@dataclass(frozen=True)
class Test:
    """One llama-bench test: `n_prompt` tokens prefilled into an empty context (pp), or `n_gen`
    tokens decoded after `depth` tokens of context (tg)."""

    __test__ = False  # not a pytest test class

    n_prompt: int = 0
    n_gen: int = 0
    depth: int = 0

    @property
    def name(self) -> str:
        base = f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"
        return f"{base} @ d{self.depth}" if self.depth else base


def llama_bench_tests(
    pp: Sequence[int], tg: Sequence[int], depths: Sequence[int] = ()
) -> list[Test]:
    """Each pp size, then each tg size in an empty context and at each depth."""
    return [Test(n_prompt=p) for p in pp] + [
        Test(n_gen=g, depth=d) for d in (0, *depths) for g in tg
    ]


@dataclass
class Measurement:
    """One run: tokens per second of the test, time to first token, peak memory, and for a tg
    test the host (Python thread) CPU seconds per decoded token: graph building, sampling,
    detokenizing and parsing, not the device's work, so it is stable on a busy machine."""

    tps: float
    ttft: float
    peak_memory: int
    host_per_token: float = 0.0


@dataclass
class Result:
    """All repetitions of one test on one runtime."""

    runtime: str
    test: Test
    runs: list[Measurement] = field(default_factory=list)

    def _stat(self, attr: str) -> tuple[float, float]:
        vals = [getattr(m, attr) for m in self.runs]
        return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0

    @property
    def tps(self) -> tuple[float, float]:
        """Mean and standard deviation of tokens per second."""
        return self._stat("tps")

    @property
    def ttft(self) -> float:
        return statistics.median(m.ttft for m in self.runs)

    @property
    def host_per_token(self) -> float:
        return statistics.median(m.host_per_token for m in self.runs)

    @property
    def peak_memory(self) -> int:
        return max(m.peak_memory for m in self.runs)


def random_prompt(n: int, seed: int) -> list[int]:
    """`n` ordinary (non-special) o200k token ids, reproducibly."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 199998, size=n).tolist()


def measure(runtime: Runtime, test: Test, seed: int = 0) -> Measurement:
    """Run one test once with a fresh cache: a prompt of `n_prompt` tokens and one token (pp),
    or a prompt of `depth` tokens (at least one) and `n_gen + 1` tokens, so that `n_gen` decode
    steps are timed (tg)."""
    prompt = random_prompt(max(1, test.depth + test.n_prompt), seed)
    max_tokens = test.n_gen + 1 if test.n_gen else 1
    mx.clear_cache()
    mx.reset_peak_memory()
    times = []
    start = time.perf_counter()
    host_first = 0.0
    for _ in runtime.generate(prompt, max_tokens):
        times.append(time.perf_counter())
        if len(times) == 1:
            host_first = time.thread_time()
    host = time.thread_time() - host_first
    if len(times) != max_tokens:
        raise RuntimeError(f"{runtime.name} made {len(times)} tokens, expected {max_tokens}")
    ttft = times[0] - start
    if test.n_gen:
        tps = test.n_gen / max(times[-1] - times[0], 1e-9)
        return Measurement(tps, ttft, mx.get_peak_memory(), host / test.n_gen)
    return Measurement(test.n_prompt / ttft, ttft, mx.get_peak_memory())


def run_tests(
    runtimes: Sequence[Runtime], tests: Sequence[Test], repetitions: int = 3,
    warmup: bool = True, progress: Any = None,
) -> list[Result]:
    """Every test on every runtime `repetitions` times, interleaved: for each repetition and
    test, the runtimes take turns in an order that rotates with the repetition."""
    results = {(r.name, t): Result(r.name, t) for t in tests for r in runtimes}
    if warmup:
        for r in runtimes:
            measure(r, Test(n_prompt=8, n_gen=0), seed=99)
            measure(r, Test(n_gen=4), seed=99)
    for rep in range(repetitions):
        for t in tests:
            k = rep % len(runtimes)
            for r in list(runtimes[k:]) + list(runtimes[:k]):
                m = measure(r, t, seed=rep)
                results[(r.name, t)].runs.append(m)
                if progress is not None:
                    progress(f"{r.name} {t.name} #{rep + 1}: {m.tps:.1f} tok/s")
    return list(results.values())


def format_table(
    results: Sequence[Result], model: str, size: int,
    decode_bytes: Callable[[Test], int] | None = None, bandwidth: float | None = None,
) -> str:
    """A llama-bench style markdown table. `decode_bytes(test)` is the bytes a token of a tg
    test reads; tg rows then show the bandwidth achieved and its share of the chip's
    `bandwidth` (GB/s; "n/a (CPU)" without one)."""
    header = ["model", "size", "runtime", "test", "t/s", "ttft ms", "peak mem", "host ms/tok",
              "decode BW"]
    rows = []
    for r in results:
        mean, std = r.tps
        bw = ""
        if r.test.n_gen and decode_bytes is not None:
            gbps = mean * decode_bytes(r.test) / 1e9
            share = f"{100 * gbps / bandwidth:.0f}% of {bandwidth:g}" if bandwidth else "n/a (CPU)"
            bw = f"{gbps:.2f} GB/s, {share}"
        host = f"{1000 * r.host_per_token:.2f}" if r.test.n_gen else ""
        rows.append([model, gb(size), r.runtime, r.test.name, f"{mean:.2f} ± {std:.2f}",
                     f"{1000 * r.ttft:.1f}", gb(r.peak_memory), host, bw])
    return markdown_table(header, rows, right={1, 4, 5, 6, 7})


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]
) -> str:
    """A markdown table with padded columns, those in `right` right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if i in right else c.ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(
        "-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)
    ) + " |"
    return "\n".join([line(header), rule, *map(line, rows)])


def ratios(
    results: Sequence[Result], ours: str, theirs: str, attr: str = "tps"
) -> dict[str, float]:
    """Per test: the median over repetitions of ours / theirs for a Measurement field (`tps`;
    `host_per_token` for tg tests only)."""
    by = {(r.runtime, r.test): r for r in results}
    out = {}
    for r in results:
        if r.runtime != ours or (theirs, r.test) not in by:
            continue
        if attr == "host_per_token" and not r.test.n_gen:
            continue
        pairs = zip(r.runs, by[(theirs, r.test)].runs, strict=True)
        out[r.test.name] = statistics.median(
            getattr(a, attr) / max(getattr(b, attr), 1e-12) for a, b in pairs
        )
    return out


def format_ratios(results: Sequence[Result], ours: str, theirs: str) -> str:
    """Each test's median speed ratio `ours / theirs` (above 1: ours faster), and for decode
    the host CPU time per token ratio (below 1: ours spends less)."""
    speed = ", ".join(f"{n} {x:.2f}x" for n, x in ratios(results, ours, theirs).items())
    host = ratios(results, ours, theirs, "host_per_token")
    line = f"{ours} / {theirs}: speed {speed}"
    if host:
        line += "; host CPU per decoded token " + ", ".join(
            f"{n} {x:.2f}x" for n, x in host.items())
    return line


# A structured answer of every kind the constraint handles (nested object, array, enum, bounded
# numbers, a string with a pattern, free text last), for `constraint_cost`: the bounded parts
# first, so that an answer of 128 tokens passes through all of them.
BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,20}$"},
        "temperature": {"type": "number", "minimum": -50, "maximum": 50},
        "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 7},
                 "maxItems": 7},
        "wind": {"type": "object", "properties": {"kmh": {"type": "integer", "minimum": 0,
                                                          "maximum": 300},
                                                  "dir": {"enum": ["N", "E", "S", "W"]}},
                 "required": ["kmh", "dir"], "additionalProperties": False},
        "summary": {"type": "string"},
    },
    "required": ["city", "temperature", "days", "wind", "summary"],
    "additionalProperties": False,
}


class _Timed:
    """A logits processor timed on its own: the forward pass is evaluated first, then the time
    until the processor returns (following the tokens, computing the mask: the part the decode
    loop overlaps with the forward) and the time its result takes to evaluate (applying it).
    MLX's worker is woken before the latter: in the decode loop it is still busy with the
    forward when the mask is queued, so its wake-up (which can take longer than applying the
    mask, on a CPU) is not the constraint's cost."""

    def __init__(self, inner: Callable[[Sequence[int], mx.array], mx.array]):
        self.inner, self.host, self.apply, self.calls = inner, 0.0, 0.0, 0

    def __call__(self, generated: Sequence[int], logits: mx.array) -> mx.array:
        mx.eval(logits)
        start = time.perf_counter()
        out = self.inner(generated, logits)
        returned = time.perf_counter()
        mx.eval(mx.zeros(1) + 1)  # wakes the worker
        applying = time.perf_counter()
        mx.eval(out)
        self.host += returned - start
        self.apply += time.perf_counter() - applying
        self.calls += 1
        return out


@dataclass(frozen=True)
class ConstraintCost:
    """Decode milliseconds per token with a JSON-schema answer and without (the same prompt,
    model and number of tokens), and the constraint's own time per token, split into computing
    the mask and applying it; one value per run."""

    with_ms: list[float]
    without_ms: list[float]
    mask_ms: list[float]
    apply_ms: list[float]
    tokens: int

    @property
    def constraint_ms(self) -> list[float]:
        """The constraint's own time per token, per run."""
        return [m + a for m, a in zip(self.mask_ms, self.apply_ms, strict=True)]

    def __str__(self) -> str:
        def best_median(values: list[float], digits: int) -> str:
            return f"{min(values):.{digits}f} | {statistics.median(values):.{digits}f}"

        extra = statistics.median(w - wo for w, wo in zip(self.with_ms, self.without_ms,
                                                          strict=True))
        return (f"JSON schema ({self.tokens} tokens, {len(self.with_ms)} runs, best | median): "
                f"decode {best_median(self.with_ms, 2)} ms/token with it, "
                f"{best_median(self.without_ms, 2)} without ({extra:+.2f} ms/token, the median "
                f"of the runs' differences); the constraint itself "
                f"{best_median(self.constraint_ms, 3)} ms/token: computing the mask "
                f"{best_median(self.mask_ms, 3)} (while the forward runs), applying it "
                f"{best_median(self.apply_ms, 3)}")


def constraint_cost(model: Any, tokenizer: Any, max_tokens: int = 128, runs: int = 3,
                    schema: dict[str, Any] | None = None, seed: int = 0) -> ConstraintCost:
    """Generate one answer (temperature 1, `seed`) constrained by `schema` (default BENCH_SCHEMA;
    the reasoning before it is constrained too: free text, harmony's headers), then as many
    tokens without a constraint (no processor: the decode loop samples a step ahead, as for any
    request without one), then the constrained answer again with the constraint timed on its
    own; `runs` times, interleaved."""
    from gptoss_mlx.chat.forcing import TurnConstraint, TurnSpec
    from gptoss_mlx.chat.harmony import HarmonyRenderer
    from gptoss_mlx.generate import TokenEvent, stream
    from gptoss_mlx.sampling import SamplingParams

    prompt = HarmonyRenderer(tokenizer).render_chat(
        [{"role": "user", "content": "The weather in Paris, as JSON."}])
    spec = TurnSpec(answer_schema=schema or BENCH_SCHEMA)

    def run(processors: list[Any], tokens: int, stops: frozenset[int] | None = None
            ) -> tuple[float, int]:
        times = []
        for event in stream(model, tokenizer, prompt, sampling=SamplingParams(seed=seed),
                            max_tokens=tokens, stop_tokens=stops, logits_processors=processors):
            if isinstance(event, TokenEvent):
                times.append(time.perf_counter())
        return (times[-1] - times[0]) / max(len(times) - 1, 1) * 1e3, len(times)

    # warm-up (untimed): the vocabulary's matcher is built once, MLX compiles its kernels
    run([TurnConstraint(tokenizer, spec, max_tokens)], min(max_tokens, 16))
    run([], min(max_tokens, 16))
    with_ms, without_ms, mask_ms, apply_ms, n = [], [], [], [], max_tokens
    for _ in range(runs):
        ms, n = run([TurnConstraint(tokenizer, spec, max_tokens)], max_tokens)
        with_ms.append(ms)
        without_ms.append(run([], n, frozenset())[0])  # no stop token: exactly n tokens
        timed = _Timed(TurnConstraint(tokenizer, spec, max_tokens))
        run([timed], max_tokens)
        mask_ms.append(timed.host / timed.calls * 1e3)
        apply_ms.append(timed.apply / timed.calls * 1e3)
    return ConstraintCost(with_ms, without_ms, mask_ms, apply_ms, n)
