"""Pick the experts backend by measurement on first use, once per machine and model shape.

On a Mac the first load times the portable experts (`mlx`, `mx.gather_qmm`) and the Metal
kernels' paths (`metal-gemv`, the decode GEMVs; `metal-fma` and `metal-mma`, the prefill grouped
GEMMs on scalar FMAs or on simdgroup_matrix units) on the model's own layer-0 experts at 1, 4 and
16 tokens (decode) and 512 tokens (prefill), after a self-check of each Metal path against the
portable experts (a path that fails it is never timed or chosen). The fastest candidate per size
makes a dispatch table: a call with N tokens runs the winner of the smallest measured size >= N
(so the decode/prefill switch point is measured too). The choice is stored in
`$XDG_CACHE_HOME/gptoss-mlx/autotune.json` (default `~/.cache/...`) under a key of chip, MLX
version, kernel source digest and model shape, and reused while that key holds. Without Metal
(Linux) nothing is measured: the portable experts are the choice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from gptoss_mlx.moe_types import MoeFn, QWeights

PORTABLE = "mlx"
DECODE_SIZES = (1, 4, 16)  # tokens per decode step that are timed
PREFILL_SIZE = 512  # tokens of the timed prefill chunk
# candidate -> keyword arguments of the Metal backend's `moe` (None: the portable experts)
CANDIDATES: dict[str, dict[str, str] | None] = {
    PORTABLE: None,
    "metal-gemv": {"path": "decode"},
    "metal-fma": {"path": "prefill", "gemm": "fma"},
    "metal-mma": {"path": "prefill", "gemm": "mma"},
}
PREFILL_CANDIDATES = (PORTABLE, "metal-fma", "metal-mma")  # the GEMVs at 512 tokens: not timed
BUDGET_S = 0.025  # timing per (candidate, size), after one warm-up call
MAX_ENTRIES = 16  # cached choices kept (other chips, models, versions)

Timer = Callable[[str, int, Callable[[], mx.array]], float]


@dataclass(frozen=True)
class Choice:
    """Measured token count -> fastest candidate, with the timings (seconds per call) and the
    candidates that failed their self-check (name -> reason)."""

    table: dict[int, str]
    times: dict[int, dict[str, float]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    def candidate(self, n: int) -> str:
        """The candidate that runs a call with `n` tokens."""
        for size in sorted(self.table):
            if n <= size:
                return self.table[size]
        return self.table[max(self.table)]

    def margin(self, size: int) -> float | None:
        """How many times faster the chosen candidate was than the portable experts at `size`."""
        t = self.times.get(size, {})
        best = t.get(self.table[size])
        return t[PORTABLE] / best if best and PORTABLE in t else None

    def describe(self) -> str:
        """One line: the choice per measured size and its margin over the portable experts."""
        parts = []
        for size in sorted(self.table):
            m = self.margin(size)
            parts.append(f"{size} tok: {self.table[size]}"
                         + (f" ({m:.2f}x vs {PORTABLE})" if m is not None else ""))
        rejected = "".join(f"; {name} failed its self-check ({why})"
                           for name, why in self.rejected.items())
        return ", ".join(parts) + rejected

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "times": self.times, "rejected": self.rejected}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Choice:
        table = {int(k): str(v) for k, v in d["table"].items()}
        if not table or any(v not in CANDIDATES for v in table.values()):
            raise ValueError(f"bad autotune table {d['table']!r}")
        times = {int(k): {str(c): float(t) for c, t in v.items()} for k, v in d["times"].items()}
        return cls(table, times, {str(k): str(v) for k, v in d["rejected"].items()})


def portable_choice(rejected: dict[str, str] | None = None) -> Choice:
    """The portable experts at every size (no Metal, or every Metal path failed)."""
    return Choice({n: PORTABLE for n in (*DECODE_SIZES, PREFILL_SIZE)}, {}, rejected or {})


def metal_available() -> bool:
    """Whether MLX has a Metal device here (False on Linux)."""
    return mx.metal.is_available()


def chip() -> str:
    """The GPU's name and architecture, as MLX reports them."""
    info = mx.device_info()
    return f"{info.get('device_name', 'unknown')} {info.get('architecture', '')}".strip()


def kernel_digest() -> str:
    """sha256 of every Metal source and of the host code that launches them."""
    from gptoss_mlx import metal
    from gptoss_mlx.kernels import moe as kernels_moe

    h = hashlib.sha256()
    for path in sorted(Path(metal.__file__).parent.glob("*.metal")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(Path(kernels_moe.__file__).read_bytes())
    return h.hexdigest()


def cache_file() -> Path:
    """`$XDG_CACHE_HOME/gptoss-mlx/autotune.json` (XDG default: ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gptoss-mlx" / "autotune.json"


def cache_key(gate: QWeights, down: QWeights, top_k: int, dtype: mx.Dtype) -> dict[str, Any]:
    """What a stored choice depends on: chip, MLX version, kernel sources and the model shape."""
    experts, inter, hidden = gate[0].shape[0], gate[0].shape[1], down[0].shape[1]
    return {"chip": chip(), "mlx": mx.__version__, "kernels": kernel_digest(),
            "shape": [experts, hidden, inter, top_k], "dtype": str(dtype).removeprefix("mlx.core.")}


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        print(f"warning: {path}: unreadable autotune cache ignored ({e})", file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def _entry_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def load_choice(key: dict[str, Any], path: Path | None = None) -> Choice | None:
    """The stored choice for `key`, or None (absent, stale, or unreadable)."""
    entry = _read_cache(path or cache_file()).get(_entry_id(key))
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    try:
        return Choice.from_json(entry)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def store_choice(key: dict[str, Any], choice: Choice, path: Path | None = None) -> None:
    """Write `choice` under `key` atomically, dropping entries for the same chip and shape made
    with other kernels or MLX versions (they can never match again)."""
    path = path or cache_file()
    data = {k: v for k, v in _read_cache(path).items()
            if isinstance(v, dict) and isinstance(v.get("key"), dict)
            and (v["key"].get("chip"), v["key"].get("shape"), v["key"].get("dtype"))
            != (key["chip"], key["shape"], key["dtype"])}
    data = dict(list(data.items())[-(MAX_ENTRIES - 1):])
    data[_entry_id(key)] = {"key": key, **choice.to_json()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: measure again next time
        print(f"warning: cannot store the autotune choice in {path} ({e})", file=sys.stderr)


def candidates(metal_fn: MoeFn) -> dict[str, MoeFn]:
    """name -> experts function: the portable experts and `metal_fn` bound to each path."""
    from gptoss_mlx.model.experts import moe

    return {name: moe if kw is None else functools.partial(metal_fn, **kw)
            for name, kw in CANDIDATES.items()}


def measure(name: str, n: int, run: Callable[[], mx.array]) -> float:
    """Median seconds of `run` (evaluated) over BUDGET_S, after one warm-up call."""
    mx.eval(run())
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < BUDGET_S and len(times) < 100):
        t0 = time.perf_counter()
        mx.eval(run())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inputs(n: int, experts: int, hidden: int, top_k: int, dtype: mx.Dtype
            ) -> tuple[mx.array, mx.array, mx.array]:
    """n random tokens, each routed to top_k distinct random experts."""
    rng = np.random.default_rng(n)
    x = mx.array(rng.normal(size=(n, hidden)).astype(np.float32)).astype(dtype)
    indices = mx.array(np.argsort(rng.random((n, experts)), axis=1)[:, :top_k].astype(np.uint32))
    weights = mx.softmax(mx.array(rng.normal(size=(n, top_k)).astype(np.float32)), axis=-1)
    return x, indices, weights


def measure_choice(metal_fn: MoeFn, gate: QWeights, up: QWeights, down: QWeights, top_k: int,
                   dtype: mx.Dtype, swiglu_limit: float = 7.0, timer: Timer = measure) -> Choice:
    """Self-check every Metal path, time the survivors and the portable experts, pick per size."""
    from gptoss_mlx.model.experts import self_check

    fns = candidates(metal_fn)
    rejected = {}
    for name, fn in fns.items():
        if name != PORTABLE:
            problem = self_check(fn, gate, up, down, top_k, dtype, swiglu_limit)
            if problem is not None:
                rejected[name] = problem
    alive = [name for name in fns if name not in rejected]
    if alive == [PORTABLE]:
        return portable_choice(rejected)
    experts, hidden = gate[0].shape[0], down[0].shape[1]
    table: dict[int, str] = {}
    times: dict[int, dict[str, float]] = {}
    for n in (*DECODE_SIZES, PREFILL_SIZE):
        x, indices, weights = _inputs(n, experts, hidden, top_k, dtype)
        times[n] = {}
        for c in alive:
            if c in rejected or (n == PREFILL_SIZE and c not in PREFILL_CANDIDATES):
                continue
            run = functools.partial(fns[c], x, indices, weights, gate, up, down, swiglu_limit)
            try:
                times[n][c] = timer(c, n, run)
            except Exception as e:  # e.g. a kernel that fails at this size: never chosen
                if c == PORTABLE:
                    raise
                rejected[c] = f"{n} tokens: {type(e).__name__}: {e}"
        table[n] = min(times[n], key=times[n].__getitem__)
    for n in times:  # a candidate that failed at some size is not used at any
        times[n] = {c: t for c, t in times[n].items() if c not in rejected}
        table[n] = min(times[n], key=times[n].__getitem__)
    return Choice(table, times, rejected)


def autotune(metal_fn: MoeFn, gate: QWeights, up: QWeights, down: QWeights, top_k: int,
             dtype: mx.Dtype, swiglu_limit: float = 7.0, *, timer: Timer = measure,
             cache: Path | None = None) -> Choice:
    """The stored choice for this chip, MLX, kernels and shape, else a new measurement (stored).
    Without Metal: the portable experts, nothing measured or stored."""
    if not metal_available():
        return portable_choice()
    key = cache_key(gate, down, top_k, dtype)
    choice = load_choice(key, cache)
    if choice is None:
        choice = measure_choice(metal_fn, gate, up, down, top_k, dtype, swiglu_limit, timer)
        store_choice(key, choice, cache)
    return choice


def tuned(choice: Choice, metal_fn: MoeFn) -> MoeFn:
    """An experts function that runs each call on `choice`'s candidate for its token count; it
    carries the choice as `.choice`."""
    fns = candidates(metal_fn)

    def moe(x: mx.array, indices: mx.array, route_weights: mx.array, gate: QWeights,
            up: QWeights, down: QWeights, swiglu_limit: float = 7.0, alpha: float = 1.702, *,
            residual: mx.array | None = None) -> mx.array:
        return fns[choice.candidate(x.shape[0])](x, indices, route_weights, gate, up, down,
                                                 swiglu_limit, alpha, residual=residual)

    moe.choice = choice  # type: ignore[attr-defined]
    return moe


def tune_model(model: Any, metal_fn: MoeFn, timer: Timer | None = None) -> Choice:
    """Autotune on `model`'s first-layer experts and install the result as backend "auto" (the
    portable experts alone when nothing was measured; with a warning when every Metal path failed
    its self-check)."""
    mlp = model.model.layers[0].mlp
    e = mlp.experts
    choice = autotune(metal_fn, e.gate_proj.qweights, e.up_proj.qweights, e.down_proj.qweights,
                      mlp.top_k, model.model.norm.weight.dtype, mlp.swiglu_limit,
                      timer=timer or measure)
    if not choice.times:  # nothing measured: no Metal, or every Metal path failed
        from gptoss_mlx.model.experts import moe

        if choice.rejected:
            why = "; ".join(f"{k}: {v}" for k, v in choice.rejected.items())
            print(f"warning: the metal experts backend failed its self-check ({why}); using the "
                  "portable mlx experts", file=sys.stderr)
        model.set_experts(moe, PORTABLE)
    else:
        model.set_experts(tuned(choice, metal_fn), "auto")
    return choice
