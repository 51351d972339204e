"""`convert --dense-bits 8|4` against the lossless conversion: agreement, bytes and decode speed.

    python benchmarks/dense_bits.py [--src CHECKPOINT] [--bits 8 4] [--text FILE] [--tokens N]

Converts one checkpoint lossless and with each `--dense-bits`, then prints for each folder its
weights, the bytes a decoded token reads, the decode speed (median of 3 greedy runs; with --src
only), and how its next-token logits agree
with the lossless folder's (argmax, top 5, KL) over a teacher-forced text. With `--src` (the
released gpt-oss-20b, say, on a Mac) the text is `--text` (default: this checkout's README),
tokenized with the converted vocabulary. Without it, a tiny random checkpoint is written and its
dense weights trained here on a synthetic language (`gptoss_mlx.convert.trained`), whose held-out
samples are the text: an untrained model's logits are too close to tied to say anything.
Folders are loaded one at a time, so the 20b fits a 16 GB Mac. Table on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from gptoss_mlx import load
from gptoss_mlx.bench import LogitAgreement, OurRuntime, Test, bytes_per_token, measure
from gptoss_mlx.chat.tokenizer import load_tokenizer
from gptoss_mlx.convert import convert
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint
from gptoss_mlx.convert.trained import SuccessorLanguage, train_dense
from gptoss_mlx.memory import gb, plan_memory

README = Path(__file__).resolve().parent.parent / "README.md"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tiny_trained(workdir: Path) -> tuple[Path, mx.array]:
    """A tiny checkpoint with trained dense weights, and held-out text of its language."""
    language = SuccessorLanguage.random()
    random = write_checkpoint(workdir / "random", tiny_config(vocab_size=4096), seed=0)
    ckpt = train_dense(random, workdir / "trained", language, progress=True)
    shutil.rmtree(random)
    return ckpt, mx.array(language.sample(4, 128, np.random.default_rng(99)))


def text_tokens(folder: Path, text: Path, n: int) -> mx.array:
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise SystemExit(f"Error: {folder} has no vocabulary: convert with --vocab PATH")
    ids = tokenizer.encode(text.read_text())[:n]
    return mx.array([ids], dtype=mx.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=None,
                    help="a released checkpoint (default: a tiny one trained here)")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[8, 4])
    ap.add_argument("--text", type=Path, default=README, help="teacher-forced text (with --src)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens of --text to use")
    ap.add_argument("--gen-tokens", type=int, default=32, help="tokens decoded per speed run")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = ap.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gptoss-dense-bits-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.src is None:
            src, tokens = tiny_trained(workdir)
        else:
            src, tokens = args.src, None
        folders = {"lossless": workdir / "lossless"}
        folders.update({f"dense-bits {b}": workdir / f"dense{b}" for b in args.bits})
        for (name, folder), bits in zip(folders.items(), [None, *args.bits], strict=True):
            t = time.perf_counter()
            convert(src, folder, dense_bits=bits)
            log(f"{name}: converted in {time.perf_counter() - t:.0f} s")
        if tokens is None:
            tokens = text_tokens(folders["lossless"], args.text, args.tokens)

        print(f"{tokens.size} teacher-forced tokens, device {mx.default_device()}")
        print(f"{'folder':<14} {'weights':>10} {'per token':>10} {'tg tok/s':>9}  vs lossless")
        reference = None
        for name, folder in folders.items():
            plan = plan_memory(folder, 4096)
            per_token = sum(bytes_per_token(plan.config, plan.specs).values())
            model, tokenizer = load(folder)
            logits = np.array(model(tokens).astype(mx.float32))
            reference = logits if reference is None else reference
            speed = "-"  # measure's prompts are o200k ids: the trained tiny vocabulary is 4096
            if args.src is not None:
                runtime = OurRuntime(model, tokenizer, name)
                speed = "{:.1f}".format(sorted(
                    measure(runtime, Test(n_gen=args.gen_tokens), seed=s).tps for s in range(3))[1])
            agreement = "-" if logits is reference else str(LogitAgreement.of(reference, logits))
            print(f"{name:<14} {gb(plan.weights_total):>10} {gb(per_token):>10} "
                  f"{speed:>9}  {agreement}", flush=True)
            del model
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
