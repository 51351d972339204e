"""Prompt cache on disk: time to first token of a prompt with a long developer message, cold and
after a "restart" that reads the message's KV cache back from `--prompt-cache-dir`.

    python benchmarks/prompt_cache_restart.py -m ~/models/gpt-oss-20b-mlx [--prefix-tokens 5000]

Three runs of the same kind of prompt (a developer message of about `--prefix-tokens` tokens,
then a short user message) on one loaded model, each with a fresh in-memory cache:
1. cold: nothing stored; the whole prompt is prefilled and the prefix is written to the folder;
2. restored: a new PromptStore on the same folder (as after a restart), another user message:
   the prefix is read back and only the rest is prefilled;
3. cold again with the store off, as the reference for 2.
Printed: prompt and cached tokens, time to first token, the file's size and the restore time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

COMMON = "the of and to in is for on that with as was by at from this have are not but".split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True, help="model folder or hub id")
    ap.add_argument("--prefix-tokens", type=int, default=5000)
    ap.add_argument("--dir", type=Path, default=None, help="store folder [default: temporary]")
    args = ap.parse_args()

    import mlx.core as mx

    from gptoss_mlx import load
    from gptoss_mlx.chat.harmony import HarmonyRenderer, SystemOptions
    from gptoss_mlx.generate import PromptCache, prefill
    from gptoss_mlx.prompt_store import PromptStore, model_identity

    model, tok = load(args.model)
    render = HarmonyRenderer(tok)
    developer = " ".join(COMMON[i % len(COMMON)] for i in range(args.prefix_tokens))
    options = SystemOptions(current_date="2025-08-05")

    def prompt(user: str) -> list[int]:
        return render.render_chat([{"role": "developer", "content": developer},
                                   {"role": "user", "content": user}], options=options)

    identity = model_identity(model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)

        def run(name: str, user: str, store: PromptStore | None) -> None:
            ids, cache = prompt(user), PromptCache(model)
            start = time.perf_counter()
            restored = store.prepare(cache, ids) if store else 0
            restore_s = time.perf_counter() - start
            logits, cached = prefill(model, cache, ids)
            mx.eval(logits)
            ttft = time.perf_counter() - start
            if store:
                store.flush()
            size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
            print(f"{name:9s} prompt {len(ids):6d} tokens, cached {cached:6d}, time to first "
                  f"token {ttft:7.3f} s (restore {restore_s:.3f} s, {restored} tokens), "
                  f"store {size / 1e6:.1f} MB")

        run("cold", "Write a haiku about caches.", PromptStore(folder, identity, tok))
        run("restored", "Name three prime numbers.", PromptStore(folder, identity, tok))
        run("no store", "Name three prime numbers.", None)


if __name__ == "__main__":
    main()
