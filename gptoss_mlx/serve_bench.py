"""Serving benchmark: concurrent streaming clients against OpenAI-compatible servers.

Each server (`gptoss-mlx serve`, `mlx_lm.server` with continuous batching) is started on the same
folder in its own process, one after the other (never both at once), on a free port. For each
concurrency N, N clients send streaming chat completions at once (the same prompts to every
server, greedy, a fixed `max_tokens`, no seed: mlx_lm.server batches only unseeded requests) and
the driver notes when each chunk carrying text arrives. The same rule counts tokens on both
servers: a stream's `usage.completion_tokens` (`stream_options.include_usage`), else its chunks.

- aggregate tokens/s: all streams' tokens over the wall time from the first request to the last
  stream's end;
- decoding tokens/s: all streams' tokens after their first over the time from the first token
  to the last (the aggregate while they decode, without the prompts' prefill before it);
- per-stream tokens/s: a stream's tokens after its first over the time they took (median);
- time to first token: from sending a request to its first chunk with text (p50, p99).

The long-prompt probe starts a few streams, waits until they decode steadily, sends a long
prompt, and reports how much the longest gap between two of their tokens around its arrival
exceeds their usual gap, against the time the long prompt's last prefill chunk takes as it runs
(attending to the rest of the prompt, cached, and sampling the first token).

`line_model` derives, from a model folder, one whose greedy output is ".\n" or ",\n" forever: the
same shapes and work per token, but every token streams as its own chunk on both servers (to our
server's parser a random model's tokens are a harmony header, held until it gives up after 48
tokens; a line break ends a header at once) and no end-of-sequence token ever comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
LINE_TOKENS = (558, 412)  # ".\n" and ",\n" in o200k
LONG_PROMPT_STREAMS = 4  # streams decoding when the long prompt arrives


@dataclass(frozen=True)
class Server:
    """How to start one server: `argv` with `{port}` in it, the `model` its requests name, and
    the `dtype` it computes in (for the report)."""

    name: str
    argv: tuple[str, ...]
    model: str
    dtype: str


def ours(folder: str | Path, max_concurrent: int, prefill_chunk: int,
         dtype: str = "bfloat16") -> Server:
    """`gptoss-mlx serve` in `dtype` with room for `max_concurrent` generations at once,
    prefilling `prefill_chunk` tokens per step."""
    return Server("gptoss-mlx", (sys.executable, "-m", "gptoss_mlx", "serve", "-m", str(folder),
                                 "--port", "{port}", "--log-level", "warning", "--dtype", dtype,
                                 "--max-batch", str(max_concurrent),
                                 "--prefill-chunk", str(prefill_chunk)), "bench", dtype)


def mlx_lm(folder: str | Path, max_concurrent: int, prefill_step: int) -> Server:
    """`mlx_lm.server` with continuous batching of up to `max_concurrent` streams, prefilling
    `prefill_step` tokens at a time, in the folder's dtype (it has no dtype option)."""
    from gptoss_mlx.memory import FLOAT_DTYPES
    from gptoss_mlx.model.weights import open_weights

    floats = sorted({s.dtype for s in open_weights(folder).specs()} & FLOAT_DTYPES.keys())
    return Server("mlx_lm.server", (
        sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--port", "{port}",
        "--log-level", "WARNING", "--decode-concurrency", str(max_concurrent),
        "--prefill-step-size", str(prefill_step)), "default_model",
        "/".join(FLOAT_DTYPES[f] for f in floats) + " (the folder's)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(server: Server, timeout: float = 180.0) -> Iterator[str]:
    """Start `server` on a free port and wait until `/health` answers; yields its base URL.
    Stops it (SIGTERM, then SIGKILL) when the block ends."""
    import httpx2

    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in server.argv]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://{HOST}:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    last = ([line for line in log.read().splitlines() if line.strip()]
                            or ["no output"])[-1]
                    raise RuntimeError(f"{server.name} did not start ({' '.join(argv)}): {last}")
                with contextlib.suppress(httpx2.HTTPError):
                    if httpx2.get(url + "/health", timeout=2).status_code == 200:
                        break
                time.sleep(0.25)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def prompt_text(n_words: int, seed: int) -> str:
    """A user message of a few tokens naming `seed`, then `n_words` common words of one o200k
    token each; different per seed."""
    from gptoss_mlx.convert.demo_corpus import WORDS

    words = [w for w in WORDS if w not in ("falcon", "goblet")]  # two tokens each
    rng = random.Random(seed)
    return f"Request {seed}:" + "".join(" " + rng.choice(words) for _ in range(n_words))


@dataclass
class Stream:
    """One streamed completion as the client saw it (perf_counter seconds)."""

    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk carrying text
    usage: dict[str, Any] | None = None  # the last chunk's, with include_usage
    end: float = 0.0

    @property
    def tokens(self) -> int:
        """`usage.completion_tokens`, else the number of chunks with text."""
        return self.usage["completion_tokens"] if self.usage else len(self.chunks)

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent if self.chunks else math.nan

    @property
    def decode_tps(self) -> float:
        """Tokens after the first over the time from the first chunk to the last."""
        span = self.chunks[-1] - self.chunks[0] if len(self.chunks) > 1 else 0.0
        return (self.tokens - 1) / span if span > 0 else math.nan


def _has_text(delta: dict[str, Any]) -> bool:
    return any(delta.get(k) for k in ("content", "reasoning_content", "reasoning", "tool_calls"))


async def stream_chat(
    client: Any, url: str, model: str, text: str, max_tokens: int,
    stop: Callable[[Stream], bool] | None = None,
) -> Stream:
    """Send one streaming chat completion; note when each chunk with text arrives. `stop(s)`,
    checked after each chunk, ends the stream early (the client disconnects)."""
    body = {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    import httpx2

    s = Stream(sent=time.perf_counter())
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank lines and SSE comments (mlx_lm.server's keepalives)
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"{url}: error in the stream: {chunk['error']}")
                s.usage = chunk.get("usage") or s.usage
                if any(_has_text(c.get("delta") or {}) for c in chunk.get("choices") or ()):
                    s.chunks.append(time.perf_counter())
                    if stop is not None and stop(s):
                        break
    except httpx2.HTTPError as e:
        raise RuntimeError(f"{url}: the stream broke: {type(e).__name__} {e}") from e
    s.end = time.perf_counter()
    return s


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100), linear between the nearest ranks."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


@dataclass
class Level:
    """Every round of one concurrency on one server."""

    concurrency: int
    rounds: list[list[Stream]] = field(default_factory=list)  # the streams that completed
    errors: list[str] = field(default_factory=list)  # why the others failed

    @property
    def streams(self) -> list[Stream]:
        return [s for r in self.rounds for s in r]

    @property
    def aggregate_tps(self) -> float:
        """Mean over rounds of all tokens over the round's wall time."""
        return statistics.mean(sum(s.tokens for s in r) / (max(s.end for s in r)
                                                            - min(s.sent for s in r))
                               for r in self.rounds if r) if any(self.rounds) else math.nan

    @property
    def decode_aggregate_tps(self) -> float:
        """Mean over rounds of all tokens after each stream's first over the time from the
        round's first token to its last: the aggregate while decoding, the prompts' prefill
        before the first token left out (time to first token measures that)."""
        rates = []
        for r in self.rounds:
            timed = [s for s in r if s.chunks]
            span = (max(s.chunks[-1] for s in timed) - min(s.chunks[0] for s in timed)
                    if timed else 0.0)
            if span > 0:
                rates.append(sum(s.tokens - 1 for s in timed) / span)
        return statistics.mean(rates) if rates else math.nan

    @property
    def stream_tps(self) -> float:
        return statistics.median(s.decode_tps for s in self.streams) if self.streams else math.nan

    def ttft(self, q: float) -> float:
        return percentile([s.ttft for s in self.streams], q)

    def summary(self) -> dict[str, float]:
        return {"clients": self.concurrency, "aggregate_tps": self.aggregate_tps,
                "decode_aggregate_tps": self.decode_aggregate_tps, "stream_tps": self.stream_tps,
                "ttft_p50": self.ttft(50),
                "ttft_p99": self.ttft(99), "tokens": sum(s.tokens for s in self.streams),
                "chunks": sum(len(s.chunks) for s in self.streams), "streams": len(self.streams),
                "failed": len(self.errors)}


async def run_level(url: str, model: str, concurrency: int, rounds: int, prompt_words: int,
                    max_tokens: int, seed: int) -> Level:
    """`rounds` times: `concurrency` clients at once, each with its own prompt. A stream the
    server breaks or refuses counts as failed (its message kept), not in the statistics."""
    import httpx2

    level = Level(concurrency)
    limits = httpx2.Limits(max_connections=concurrency + 4)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(600.0), limits=limits) as client:
        for r in range(rounds):
            texts = [prompt_text(prompt_words, seed + 1000 * r + i) for i in range(concurrency)]
            done = await asyncio.gather(
                *(stream_chat(client, url, model, t, max_tokens) for t in texts),
                return_exceptions=True)
            for d in done:
                if isinstance(d, BaseException) and not isinstance(d, RuntimeError):
                    raise d
            level.rounds.append([d for d in done if isinstance(d, Stream)])
            level.errors += [str(d) for d in done if isinstance(d, RuntimeError)]
    return level


@dataclass
class LongPrompt:
    """How a long prompt arriving delays streams that are decoding."""

    prompt_tokens: int  # the long request's prompt, as its server counted it
    long_ttft: float  # the long request's time to first token
    chunk_tokens: int
    chunk_time: float  # its last chunk as it runs, at full depth (see `_last_chunk_time`)
    usual_gap: float  # the streams' median gap between tokens before the arrival
    worst_gap: float  # their longest gap overlapping [arrival, long request's first token]
    chunk_cached: int = -1  # the prompt tokens the server reported cached when timing the chunk

    @property
    def extra_delay(self) -> float:
        return self.worst_gap - self.usual_gap

    @property
    def chunk_timed(self) -> bool:
        """Whether `chunk_time` is one chunk's: the server said it had the rest cached (or said
        nothing of its cache)."""
        return self.chunk_cached < 0 or self.prompt_tokens - self.chunk_cached <= self.chunk_tokens


PROBE_TOKENS = 8  # max_tokens of the probes' requests (a real model's header comes first)
TAIL_WORDS = 16  # words left out of the chunk for the tokens the template adds after them


async def _last_chunk_time(client: Any, url: str, model: str, words: int, chunk_tokens: int,
                           seed: int, repeats: int = 3) -> tuple[float, int]:
    """The costliest chunk of a `words`-word prompt as it runs: its last, attending to all the
    tokens before it, then sampling the first token. Each of `repeats` times, the prompt cut
    `chunk_tokens - TAIL_WORDS` words short is sent (the server's prompt cache keeps it), then
    the whole prompt; the median of the latter's time to first token (HTTP included), and the
    fewest prompt tokens the server reported cached (-1: it did not say)."""
    times, cached = [], []
    for i in range(repeats):
        await stream_chat(client, url, model,
                          prompt_text(max(1, words - chunk_tokens + TAIL_WORDS), seed + i),
                          PROBE_TOKENS)
        full = await stream_chat(client, url, model, prompt_text(words, seed + i), PROBE_TOKENS)
        times.append(full.ttft)
        details = (full.usage or {}).get("prompt_tokens_details") or {}
        cached.append(details.get("cached_tokens", -1))
    return statistics.median(times), min(cached)


async def long_prompt_probe(url: str, model: str, *, streams: int = LONG_PROMPT_STREAMS,
                            long_words: int = 4000,
                            chunk_tokens: int = 512, warm_tokens: int = 8,
                            seed: int = 777) -> LongPrompt:
    """`streams` clients decode; after each has `warm_tokens` tokens a `long_words` prompt
    arrives; the streams end `warm_tokens` tokens after its first token."""
    import httpx2

    async with httpx2.AsyncClient(timeout=httpx2.Timeout(600.0)) as client:
        chunk_time, chunk_cached = await _last_chunk_time(client, url, model, long_words,
                                                          chunk_tokens, seed)
        warm = asyncio.Event()
        long_done: list[float] = []
        running: list[Stream] = []

        def stop(s: Stream) -> bool:
            if not any(r is s for r in running):
                running.append(s)
            if len(running) == streams and all(len(r.chunks) >= warm_tokens for r in running):
                warm.set()
            return bool(long_done) and sum(t > long_done[0] for t in s.chunks) >= warm_tokens

        texts = [prompt_text(16, seed + 100 + i) for i in range(streams)]
        tasks = [asyncio.create_task(stream_chat(client, url, model, t, 100_000, stop))
                 for t in texts]
        waiter = asyncio.create_task(warm.wait())
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if not warm.is_set():  # a stream ended (or failed) before they all decoded
            for t in (waiter, *tasks):
                t.cancel()
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            raise RuntimeError(f"{url}: a stream ended before {streams} streams decoded")
        arrival = time.perf_counter()
        long = await stream_chat(client, url, model, prompt_text(long_words, seed + 200),
                                 PROBE_TOKENS)
        long_done.append(long.chunks[0] if long.chunks else long.end)
        decoded = await asyncio.gather(*tasks)
    usual, worst = [], 0.0
    for s in decoded:
        pairs = list(zip(s.chunks, s.chunks[1:], strict=False))
        usual += [b - a for a, b in pairs if b < arrival]
        worst = max([worst] + [b - a for a, b in pairs if b > arrival and a < long_done[0]])
    prompt_tokens = long.usage["prompt_tokens"] if long.usage else -1
    return LongPrompt(prompt_tokens, long.ttft, chunk_tokens, chunk_time,
                      statistics.median(usual), worst, chunk_cached)


@dataclass
class ServerRun:
    """One server's results."""

    server: str
    levels: list[Level]
    long_prompt: LongPrompt | None = None
    long_prompt_error: str = ""  # why the long-prompt probe failed
    dtype: str = ""

    def to_json(self) -> dict[str, Any]:
        lp = self.long_prompt
        return {"server": self.server, "dtype": self.dtype,
                "levels": [lv.summary() for lv in self.levels],
                "long_prompt": {**asdict(lp), "extra_delay": lp.extra_delay} if lp else None,
                "long_prompt_error": self.long_prompt_error or None}


def bench_server(server: Server, clients: Sequence[int], *, rounds: int, prompt_words: int,
                 max_tokens: int, long_words: int, chunk_tokens: int,
                 progress: Callable[[str], None] = lambda s: None) -> ServerRun:
    """Start `server`, warm it up, run every concurrency in `clients`, then (with `long_words`)
    the long-prompt probe; stop it."""
    with launched(server) as url:
        progress(f"{server.name}: up at {url}")
        asyncio.run(run_level(url, server.model, 2, 1, prompt_words, 8, seed=99_999))
        levels = []
        for n in clients:
            level = asyncio.run(run_level(url, server.model, n, rounds, prompt_words,
                                          max_tokens, seed=10_000 * n))
            progress(f"{server.name}: {n} clients: {level.aggregate_tps:.1f} tok/s aggregate, "
                     f"{level.stream_tps:.1f} per stream, TTFT p50 {1000 * level.ttft(50):.0f} ms"
                     + (f"; {len(level.errors)} failed: {level.errors[0]}" if level.errors
                        else ""))
            levels.append(level)
        run = ServerRun(server.name, levels, dtype=server.dtype)
        if long_words:
            try:
                run.long_prompt = asyncio.run(long_prompt_probe(
                    url, server.model, long_words=long_words, chunk_tokens=chunk_tokens))
                progress(f"{server.name}: long prompt: {describe_long_prompt(run.long_prompt)}")
            except RuntimeError as e:
                run.long_prompt_error = str(e)
                progress(f"{server.name}: the long-prompt probe failed: {e}")
    return run


def describe_long_prompt(lp: LongPrompt) -> str:
    delay = (f"a {lp.prompt_tokens}-token prompt arriving while {LONG_PROMPT_STREAMS} streams "
             f"decode delays their next token by {1000 * lp.extra_delay:.0f} ms (longest gap "
             f"{1000 * lp.worst_gap:.0f} ms, usual {1000 * lp.usual_gap:.1f} ms)")
    own = f"its own TTFT {1000 * lp.long_ttft:.0f} ms"
    if not lp.chunk_timed:
        return (f"{delay}; its last chunk could not be timed: with all but its last "
                f"{lp.chunk_tokens} tokens sent before, the server had {lp.chunk_cached} cached "
                f"(TTFT {1000 * lp.chunk_time:.0f} ms); {own}")
    verdict = "within" if lp.extra_delay <= lp.chunk_time else "MORE than"
    cached = (f"{lp.chunk_cached} tokens cached" if lp.chunk_cached >= 0
              else "cached tokens not reported")
    return (f"{delay}, {verdict} its last {lp.chunk_tokens}-token prefill chunk at full depth "
            f"({1000 * lp.chunk_time:.0f} ms: the TTFT of the prompt with the rest cached, "
            f"{cached}); {own}")


def format_run(run: ServerRun) -> str:
    """A markdown table of one server's levels."""
    from gptoss_mlx.bench import markdown_table

    rows = [[run.server, str(lv.concurrency), f"{lv.aggregate_tps:.1f}",
             f"{lv.decode_aggregate_tps:.1f}", f"{lv.stream_tps:.1f}",
             f"{1000 * lv.ttft(50):.0f}", f"{1000 * lv.ttft(99):.0f}", str(len(lv.errors))]
            for lv in run.levels]
    return markdown_table(["server", "clients", "aggregate t/s", "decoding t/s", "per-stream t/s",
                           "TTFT p50 ms", "TTFT p99 ms", "failed"], rows, right=set(range(1, 8)))


def format_ratios(a: ServerRun, b: ServerRun) -> str:
    """Per concurrency, `a / b`: speeds (above 1: a faster) and TTFTs (below 1: a sooner); and
    each server's aggregate and decoding aggregate over its first level's (one client's)."""
    from gptoss_mlx.bench import markdown_table

    def scaling(run: ServerRun, level: Level) -> str:
        first = run.levels[0]
        return (f"{level.aggregate_tps / first.aggregate_tps:.2f}x / "
                f"{level.decode_aggregate_tps / first.decode_aggregate_tps:.2f}x")

    rows = [[str(x.concurrency), f"{x.aggregate_tps / y.aggregate_tps:.2f}x",
             f"{x.decode_aggregate_tps / y.decode_aggregate_tps:.2f}x",
             f"{x.stream_tps / y.stream_tps:.2f}x", f"{x.ttft(50) / y.ttft(50):.2f}x",
             f"{x.ttft(99) / y.ttft(99):.2f}x", scaling(a, x), scaling(b, y)]
            for x, y in zip(a.levels, b.levels, strict=True)]
    return markdown_table(
        ["clients", "aggregate", "decoding", "per-stream", "TTFT p50", "TTFT p99",
         f"{a.server} scaling (aggregate / decoding)", f"{b.server} scaling"], rows,
        right=set(range(8)))


def line_model(src: str | Path, dst: str | Path, seed: int = 0) -> Path:
    """A copy of the model folder `src` at `dst` (files linked, the lm_head's file rewritten)
    whose lm_head rows are zero but two: a random vector for ".\\n" and its negative for ",\\n",
    so one of them always wins: greedy output is one of them forever, at the same cost."""
    import mlx.core as mx

    src, dst = Path(src), Path(dst)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    head_file = index["weight_map"]["lm_head.weight"]
    arrays, meta = mx.load(str(src / head_file), return_metadata=True)
    head = arrays["lm_head.weight"]
    if head.dtype not in (mx.bfloat16, mx.float16, mx.float32):
        raise ValueError(f"{src / head_file}: lm_head.weight is {head.dtype}; expected an "
                         "unquantized float lm_head")
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != head_file:
            os.symlink(f.resolve(), dst / f.name)
    u = mx.random.normal((head.shape[1],), key=mx.random.key(seed)).astype(head.dtype)
    rows = mx.zeros_like(head)
    rows[LINE_TOKENS[0]] = u
    rows[LINE_TOKENS[1]] = -u
    arrays["lm_head.weight"] = rows
    mx.save_safetensors(str(dst / head_file), arrays, metadata=meta)
    return dst
