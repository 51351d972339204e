"""Write a folder under a temporary sibling name and move it into place only when complete.

The sibling is `.DST.partial-PID`. Ctrl-C, SIGTERM and SIGHUP (a closed terminal) remove it
before the process ends; one left by a process killed outright (SIGKILL, a power cut) is
removed by the next conversion into the same parent folder, once that PID is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .source import ConvertError

_PARTIAL = re.compile(r"\..+\.partial-(\d+)")
# Signals that end the process by default and that a conversion turns into a clean exit.
TERMINATING = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C (cleanups run), then the process exits
    quietly with 128 + the signal number (143, 129), as the shell reports a killed command."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def check_destination(dst: Path, force: bool) -> None:
    """Refuse an existing `dst` unless `force`, and a `dst` under a file."""
    if dst.exists() and not force:
        raise ConvertError(f"{dst}: already exists (pass --force to replace it)")
    parent = next((p for p in dst.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConvertError(f"{dst}: cannot be created, {parent} is a file, not a folder")


@contextmanager
def staged_folder(dst: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `dst`; on success it replaces `dst`, on any failure
    (Ctrl-C included) it is removed. An existing `dst` is refused unless `force`."""
    check_destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dst.parent)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with _terminating_signals_raise():
        try:
            tmp.mkdir()
            yield tmp
            with _signals_deferred():
                _replace(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the `.NAME.partial-PID` folders in `parent` whose process is gone; return them.
    A folder of a live process (or one we may not signal: another user's) is left alone."""
    removed = []
    for path in parent.iterdir():
        match = _PARTIAL.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        if _alive(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed {path}, left by an interrupted conversion (process "
              f"{match.group(1)} is gone)", file=sys.stderr)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 checks without sending anything; on Windows
    os.kill would end the process, so there every PID counts as alive)."""
    if pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's, or not a real PID
        return True
    return True


@contextmanager
def _terminating_signals_raise() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise `Terminated` in the main thread (the default
    would end the process at once, skipping cleanups). Handlers someone set (or SIG_IGN, as
    under `nohup`) stay as they are; the previous handlers come back on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        for s in TERMINATING:  # a second signal must not interrupt the cleanup
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {s: signal.getsignal(s) for s in TERMINATING}
    for s, handler in previous.items():
        if handler == signal.SIG_DFL:
            signal.signal(s, raise_terminated)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP back until the block is done (between its renames, DST
    is briefly absent), then deliver the first one held. Python runs signal handlers in the
    main thread whichever thread the signal reached, so recording handlers hold it back where
    a signal mask on the main thread would not (another thread may take the signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, *TERMINATING)}
    for s, handler in previous.items():
        if handler != signal.SIG_IGN:
            signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if held:
        signal.raise_signal(held[0])  # to the handler in place before the block


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished folder into place, replacing an existing `dst`."""
    if not dst.exists():
        tmp.rename(dst)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    dst.rename(old)
    tmp.rename(dst)
    if old.is_dir() and not old.is_symlink():  # a link goes, not the folder it points to
        shutil.rmtree(old)
    else:
        old.unlink()
