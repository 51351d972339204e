"""One model on two ranks through `mx.distributed` (the ring backend over loopback), run as a user
would: `mlx.launch -n 2 -- gptoss-mlx ...`, or the two ranks started by hand with the environment
`mlx.launch` gives them, so each rank's exit status and timing can be checked.

The oracle for what the two ranks print is the single process on the same model folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from serving import HOST, free_port

from gptoss_mlx.model.local_ranks import launch_command

GPTOSS = ["-m", "gptoss_mlx"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`mlx.launch -n 2 --backend ring -- gptoss-mlx ARGS` on this machine."""
    return subprocess.run(launch_command(2, [*GPTOSS, *args]), capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def by_hand(*args: str, ranks: tuple[int, ...] = (0, 1), **env: str) -> list[subprocess.Popen]:
    """The ranks started as `mlx.launch` starts them (MLX_RANK, a ring hostfile), each its own
    process with its own exit status."""
    hostfile = Path(os.environ.get("TMPDIR", "/tmp")) / f"gptoss-ring-{os.getpid()}.json"
    hostfile.write_text(json.dumps([[f"{HOST}:{free_port()}"], [f"{HOST}:{free_port()}"]]))
    return [subprocess.Popen([sys.executable, *GPTOSS, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE,
                             env={**ENV, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile), **env})
            for r in ranks]


def test_generate_on_two_ranks_prints_the_single_process_text(tiny_model_dir: Path) -> None:
    """In float32: the shards sum in another order than one process, and in bfloat16 a near-tie
    between two tokens can flip the greedy text (it did when the date in the prompt changed)."""
    args = ("generate", "-m", str(tiny_model_dir), "-p", "Name three rivers.", "--raw",
            "--temperature", "0", "--max-tokens", "24", "--dtype", "float32")
    single = subprocess.run([sys.executable, *GPTOSS, *args], capture_output=True, text=True,
                            timeout=120, env=ENV)
    assert single.returncode == 0, single.stderr
    two = launch(*args)
    assert two.returncode == 0, two.stderr
    assert "[WARN]" not in two.stderr, two.stderr  # mlx.launch warns of a rank exiting non-zero
    assert two.stdout == single.stdout  # once: the follower prints nothing
    assert two.stdout.count("<|start|>assistant") == single.stdout.count("<|start|>assistant")
    for r in (0, 1):  # each rank's share, before loading
        assert f"memory plan (rank {r} of 2): " in two.stderr
    assert two.stderr.count("prompt: ") == 1  # stats from rank 0 only


def test_a_batch_of_prompts_on_two_ranks_gives_the_single_process_results(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`generate --prompts`: prompts of different lengths decode together; the output file is
    the single process's, byte for byte (in float32, as the test above)."""
    lines = [{"messages": [{"role": "user", "content": text}], "max_tokens": n}
             for text, n in [("Hi.", 9), ("Name the longest rivers of Europe and Asia.", 14),
                             ("Why is the sky blue?", 6), ("Count to ten, slowly.", 12)]]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ("generate", "-m", str(tiny_model_dir), "--prompts", str(prompts), "--temperature",
            "0", "--dtype", "float32")
    single = subprocess.run([sys.executable, *GPTOSS, *args, "--output", str(tmp_path / "1")],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert single.returncode == 0, single.stderr
    two = launch(*args, "--output", str(tmp_path / "2"))
    assert two.returncode == 0, two.stderr
    assert "error" not in two.stderr, two.stderr
    assert len((tmp_path / "1").read_text().splitlines()) == len(lines)
    assert (tmp_path / "2").read_bytes() == (tmp_path / "1").read_bytes()


@pytest.fixture()
def two_rank_server(tiny_model_dir: Path) -> Iterator[int]:
    """`serve --max-batch 4` under `mlx.launch -n 2` in float32; yields rank 0's port."""
    port = free_port()
    proc = subprocess.Popen(launch_command(2, [*GPTOSS, "serve", "-m", str(tiny_model_dir),
                                               "--port", str(port), "--log-level", "warning",
                                               "--max-batch", "4", "--dtype", "float32"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)  # a group of its own, as on a terminal
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the two-rank server did not start"
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5):
                break
        except OSError:
            time.sleep(0.3)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    try:
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        _, alive = psutil.wait_procs(ranks, timeout=30)
        proc.kill()  # mlx.launch itself may linger after a Ctrl-C (not our process)
        _, err = proc.communicate()
        for p in alive:
            p.kill()
        assert not alive, err
        assert "error:" not in err, err  # rank 1 exited cleanly when rank 0 let it go


def test_serve_on_two_ranks_answers_the_official_client(
    tiny_model_dir: Path, two_rank_server: int
) -> None:
    from openai import OpenAI
    from serving import running

    from gptoss_mlx import load
    from gptoss_mlx.server.app import create_app
    from gptoss_mlx.server.engine import Engine

    def answers(port: int) -> list[tuple[dict, int]]:
        client = OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="unused", max_retries=0)

        def ask(topic: str) -> tuple[dict, int]:
            r = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Tell me about {topic}."}],
                temperature=0, max_tokens=12)
            details = r.usage.prompt_tokens_details if r.usage else None
            return ({"message": r.choices[0].message.model_dump(),
                     "finish": r.choices[0].finish_reason},
                    details.cached_tokens or 0 if details else 0)

        first = [ask("rivers"), ask("rivers")]  # the second reuses the first's prompt cache
        topics = ["lakes", "the seas of the northern hemisphere and their coasts",
                  "rivers and their deltas", "the longest mountain ranges on every continent "
                  "and the rivers that rise in them"]  # prompts of different lengths
        with ThreadPoolExecutor(4) as pool:  # four generations decoding together in a batch
            together = list(pool.map(ask, topics))
        return first + together

    got = answers(two_rank_server)
    model, tokenizer = load(tiny_model_dir, dtype="float32")  # no bfloat16 near-ties to flip
    with running(create_app(Engine(model, tokenizer, max_batch=4), "tiny")) as port:
        want = answers(port)
    assert [answer for answer, _ in got] == [answer for answer, _ in want]
    assert got[1][1] > 0  # cached tokens: the prompt cache works across ranks


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
@pytest.mark.parametrize("victim", [1, 0])
def test_killing_one_rank_mid_generation_ends_the_other_with_one_error(
    tiny_model_dir: Path, tmp_path: Path, victim: int, batched: bool
) -> None:
    if batched:  # the first line's result is out while the other two still decode together
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(
            {"messages": [{"role": "user", "content": text}], "max_tokens": n}) + "\n"
            for text, n in [("Hi.", 8), ("Count to a million.", 100000),
                            ("Name every river.", 100000)]))
        what: tuple[str, ...] = ("--prompts", str(prompts))
    else:
        what = ("-p", "Count to a million.", "--raw")
    ranks = by_hand("generate", "-m", str(tiny_model_dir), *what, "--temperature", "1",
                    "--seed", "0")
    try:
        assert ranks[0].stdout is not None
        assert ranks[0].stdout.read(1), ranks[0].communicate()[1]  # generating
        ranks[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        survivor = ranks[1 - victim]
        _, err = survivor.communicate(timeout=30)
        took = time.monotonic() - killed
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert survivor.returncode == 1
    assert took < 10, f"the survivor took {took:.1f} s to exit"
    text = err.decode()
    # MLX's ring threads print their own "[ring] Socket N was closed by the peer" and its newline
    # in separate writes, so our line (one write) may land right after that text: count ours.
    assert text.count("error:") == 1, text
    assert (f"error: rank {1 - victim} of 2: rank {victim} is gone (it exited); "
            "ending every rank\n") in text, text
    assert "Traceback" not in text


def test_a_rank_that_cannot_connect_gives_up_with_one_error(tiny_model_dir: Path) -> None:
    (alone,) = by_hand("generate", "-m", str(tiny_model_dir), "-p", "Hi", ranks=(1,),
                       GPTOSS_MLX_CONNECT_TIMEOUT="2")
    _, err = alone.communicate(timeout=60)
    assert alone.returncode != 0
    assert err.decode().strip().splitlines()[-1] == (
        "error: rank 1: could not connect to the other ranks within 2 s (backend ring); is "
        "every rank started, and the hostfile right? ($GPTOSS_MLX_CONNECT_TIMEOUT)")


def plan(model: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *GPTOSS, "plan", "-m", str(model), *args],
                          capture_output=True, text=True, timeout=120, env=ENV)


def test_plan_splits_the_kv_cache_by_heads_and_says_whether_it_fits(tiny_model_dir: Path) -> None:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    ctx = 1024
    r = plan(tiny_model_dir, "--ranks", "2", "--memory-per-rank", "64GB", "--max-context",
             str(ctx))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == [
        "memory plan (rank 0 of 2)", "memory plan (rank 1 of 2)"]
    assert lines[2].startswith("fits: 2 ranks of 64.00 GB")
    # the KV cache from config.json: keys and values of half the KV heads, bf16; full layers
    # hold the context (in steps of 256), sliding ones window + 1024 + 256 positions
    per_token = 2 * cfg["num_key_value_heads"] // 2 * cfg["head_dim"] * 2
    sliding = sum(t == "sliding_attention" for t in cfg["layer_types"])
    full = cfg["num_hidden_layers"] - sliding
    kv = per_token * (full * ctx + sliding * (cfg["sliding_window"] + 1024 + 256))
    assert f"KV cache {kv / 1e6:.1f} MB" in lines[0]
    total = float(lines[0].split(": ")[1].split(" MB")[0]) * 1e6

    tight = plan(tiny_model_dir, "--ranks", "2", "--memory-per-rank", f"{int(total * 0.9)}",
                 "--max-context", str(ctx))
    assert tight.returncode == 1
    assert tight.stderr.startswith("Error: does not fit on rank 0: ")
    assert "--max-context" in tight.stderr  # what would fit

    odd = plan(tiny_model_dir, "--ranks", "3")
    assert odd.returncode == 1
    assert odd.stderr.strip().endswith(
        f"3 ranks: num_key_value_heads={cfg['num_key_value_heads']} does not split into 3 "
        "equal parts")


def test_a_follower_replaying_rank_0s_messages_holds_the_same_kv_caches(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In one process: rank 0's messages are recorded, then replayed to `follow`; every KV cache
    rank 0 still holds is mirrored position for position (reuse by prefix, a generation closed
    early with a step queued, a cache trimmed back, caches dropped and freed, generations
    decoding together in a batch that rows join and leave, taken back into their caches)."""
    import gc

    import mlx.core as mx
    import numpy as np

    from gptoss_mlx import distributed, load
    from gptoss_mlx.generate import PromptCache, stream
    from gptoss_mlx.sampling import SamplingParams
    from gptoss_mlx.scheduler import BatchGenerator

    sent: list[np.ndarray] = []

    def record_or_replay(message: np.ndarray | None) -> np.ndarray:
        if message is not None:
            sent.append(message.copy())
            return message
        return sent.pop(0)

    monkeypatch.setattr(distributed, "_exchange", record_or_replay)
    model, tokenizer = load(tiny_model_dir)
    leader = distributed.Leader(model)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)

    def run(cache: PromptCache, prompt: list[int], n: int, stop_after: int | None = None) -> None:
        events = stream(leader, tokenizer, prompt, cache=cache, max_tokens=n,
                        stop_tokens=frozenset())
        for i, _ in enumerate(events):
            if stop_after is not None and i + 1 == stop_after:
                events.close()  # the next step is already queued: the cache is trimmed back
                break

    kept, other = PromptCache(leader), PromptCache(leader)
    run(kept, ids[:20], 6)
    run(kept, ids[:30], 5, stop_after=2)  # reuses the first 20, stops early
    run(other, ids[5:25], 4)
    run(kept, ids[:12], 3)  # trimmed back into the prompt
    del other
    gc.collect()  # its id goes to the followers with the next message
    run(PromptCache(leader), ids[:8], 2)
    gc.collect()

    batch = BatchGenerator(leader, tokenizer, prefill_chunk=8)
    caches = [kept, PromptCache(leader), PromptCache(leader), PromptCache(leader)]
    sampling = SamplingParams(temperature=1, seed=3)  # tokens sampled on rank 0 only
    joins = [(ids[:16], 12), (ids[3:14], 16), (ids[20:41], 10), (ids[:25], 9)]  # (prompt, tokens)
    for i, (prompt, n) in enumerate(joins[:3]):
        batch.submit(prompt, cache=caches[i], sampling=sampling, max_tokens=n,
                     stop_tokens=frozenset())
    steps = 0
    while batch.busy:
        batch.step()
        steps += 1
        if steps == 6:  # joins while the others decode together (the first reuses kept)
            batch.submit(joins[3][0], cache=caches[3], sampling=sampling, max_tokens=joins[3][1],
                         stop_tokens=frozenset())
    del batch
    run(caches[1], caches[1].tokens[:10] + ids[:4], 3)  # a cache taken back, reused by prefix
    caches.pop(2)  # one dropped after the batch
    gc.collect()
    leader.finish(0)
    rows = [m[distributed.BATCH] for m in sent if m[distributed.BATCHED]]
    assert max(rows) >= 3 and 2 in rows  # decode steps of 2 and of 3+ rows went to the followers

    mirrors: dict[int, list] = {}
    assert distributed.follow(model, mirrors) == 0
    assert not sent  # every message was consumed
    # the dropped caches, and those a batch took back as new ones, were freed on the follower
    assert sorted(mirrors) == sorted(leader.id_of(c.layers) for c in caches)
    for cache in caches:
        for ours, theirs in zip(cache.layers, mirrors[leader.id_of(cache.layers)], strict=True):
            assert ours.offset == theirs.offset == len(cache.tokens)
            held = ours.offset - getattr(ours, "start", 0)
            assert getattr(ours, "start", 0) == getattr(theirs, "start", 0)
            for a, b in zip(ours.state, theirs.state, strict=True):
                assert np.array_equal(np.array(a[:, :, :held].astype(mx.float32)),
                                      np.array(b[:, :, :held].astype(mx.float32)))


def test_prompt_from_stdin_is_refused_under_the_launcher(tiny_model_dir: Path) -> None:
    (rank,) = by_hand("generate", "-m", str(tiny_model_dir), "-p", "-", ranks=(0,))
    _, err = rank.communicate(b"never read", timeout=60)
    assert rank.returncode == 2  # a usage error, before waiting for the other rank
    assert err.decode().strip().splitlines()[-1] == (
        "Error: -p - cannot read stdin under mlx.launch, which never closes the ranks' stdin; "
        'give the prompt itself: -p "$(cat FILE)"')
