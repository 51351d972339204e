"""Write a folder under a temporary sibling name and move it into place only when complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .source import ConvertError


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
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
