"""Convert benchmark: `gptoss-mlx convert` against a plain copy and `mlx_lm.convert`, side by side.

Each contender runs as a child process on the same input; wall time and the child's peak RSS
(from wait4's rusage) are reported. The input is a synthetic checkpoint of the real 20b shape
written with `gptoss-mlx synthesize` (about 13.8 GB), removed afterwards unless --keep.

    python benchmarks/convert.py --workdir DIR_WITH_45GB_FREE [--preset 20b] [--mlx-lm-timeout S]

The page cache is dropped before each run when permitted (root), so every contender reads cold;
otherwise the report says the runs were warm.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    """One contender's result."""

    name: str
    seconds: float
    peak_rss: int  # bytes
    status: str


def run_child(name: str, cmd: list[str], timeout: float | None, log: Path) -> Run:
    """Run `cmd` as a child, killing it after `timeout` s; its wall time and peak RSS."""
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr)
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL)) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        if timer:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode == -signal.SIGKILL and timeout:
        verdict = f"killed after the {timeout:.0f} s limit"
    elif proc.returncode != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        verdict = f"failed (exit {proc.returncode}): {tail[-1][:160] if tail else ''}"
    else:
        verdict = "ok"
    maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(f"[{name}] {verdict}, {seconds:.1f} s, peak RSS {maxrss / 2**30:.2f} GiB",
          file=sys.stderr)
    return Run(name, seconds, maxrss, verdict)


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache; False when not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench-convert"))
    ap.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    ap.add_argument("--src", type=Path, help="an existing checkpoint instead of a synthetic one")
    ap.add_argument("--vocab", type=Path,
                    default=REPO.parent / "shared" / "tokenizer" / "o200k_base.tiktoken",
                    help="o200k_base.tiktoken for the synthetic release's tokenizer files")
    ap.add_argument("--mlx-lm-timeout", type=float, default=1800.0)
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="runs of ours and cp (median shown)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the outputs")
    args = ap.parse_args()

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = args.src.resolve() if args.src else work / f"ckpt-{args.preset}"
    exe = [sys.executable, "-m", "gptoss_mlx"]
    if not src.exists():
        cmd = [*exe, "synthesize", str(src), "--preset", args.preset, "--layout", "hf"]
        if args.vocab.is_file():
            cmd += ["--vocab", str(args.vocab)]
        made = run_child("synthesize", cmd, None, work / "synthesize.log")
        if made.status != "ok":
            sys.exit(f"could not write the checkpoint: {made.status}")
    size = folder_bytes(src)

    ours, copied, theirs = (work / n for n in ("out-gptoss-mlx", "out-cp", "out-mlx-lm"))
    contenders = [
        ("gptoss-mlx convert", [*exe, "convert", str(src), str(ours)], None, ours),
        ("cp -r (plain copy)", ["cp", "-r", str(src), str(copied)], None, copied),
    ]
    if not args.skip_mlx_lm:
        contenders.append(("mlx_lm.convert", [sys.executable, "-m", "mlx_lm", "convert",
                                               "--hf-path", str(src), "--mlx-path", str(theirs)],
                           args.mlx_lm_timeout, theirs))
    # Alternate the order of ours and cp between rounds; mlx_lm.convert runs once.
    schedule = [c for r in range(args.rounds) for c in (contenders[:2][:: 1 - 2 * (r % 2)])]
    schedule += contenders[2:]
    runs: dict[str, list[Run]] = {}
    cold = True
    load = os.getloadavg()[0]
    try:
        for i, (name, cmd, timeout, out) in enumerate(schedule):
            shutil.rmtree(out, ignore_errors=True)
            cold = drop_caches() and cold
            run = run_child(name, cmd, timeout, work / f"run-{i}.log")
            written = folder_bytes(out) if out.exists() else 0
            run.status += f", wrote {written / 1e9:.2f} GB"
            runs.setdefault(name, []).append(run)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep and not args.src:
            shutil.rmtree(src, ignore_errors=True)

    def median(name: str) -> float:
        return statistics.median(r.seconds for r in runs[name])

    copy = median(contenders[1][0])
    print(f"\ninput: {src.name}, {size / 1e9:.2f} GB; page cache "
          f"{'dropped before each run (cold reads)' if cold else 'NOT dropped (warm reads)'}; "
          f"load average {load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'contender':<22}{'median s':>9}{'x copy':>8}{'peak RSS GiB':>14}  runs (s); result")
    for name, rs in runs.items():
        walls = ", ".join(f"{r.seconds:.1f}" for r in rs)
        print(f"{name:<22}{median(name):>9.1f}{median(name) / copy:>8.2f}"
              f"{max(r.peak_rss for r in rs) / 2**30:>14.2f}  {walls}; {rs[-1].status}")
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024)
    print(f"(a child's peak RSS includes this driver's {floor / 2**20:.0f} MiB at fork time)")
    ours = runs[contenders[0][0]]
    rss_ok = max(r.peak_rss for r in ours) < 2**31
    time_ok = median(contenders[0][0]) <= 1.5 * copy
    print(f"\ntargets: peak RSS < 2 GiB: {'met' if rss_ok else 'MISSED'}; "
          f"time <= 1.5x copy: {'met' if time_ok else 'MISSED'}")

if __name__ == "__main__":
    main()
