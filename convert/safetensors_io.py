"""Streaming safetensors I/O: tensors are read and written a slice at a time, never held together.

The safetensors package writes only whole dicts of tensors, which would hold a 5 GB shard in
memory, and its memory-mapped reads leave every touched page in the process's resident set. The
file format is a little-endian u64 header length, a JSON header of names, dtypes, shapes and byte
offsets, then the raw bytes; this module validates that header itself and reads row ranges with
plain reads (hinting the kernel to read ahead), and writes the header first and then streams each
tensor's bytes in order; bytes copied unchanged go file to file inside the kernel.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

# safetensors dtype code -> (numpy dtype that holds the same bytes, bytes per element)
DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, safetensors dtype code and shape of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


MAX_HEADER_BYTES = 100 * 1024**2
COPY_BLOCK = 16 * 1024**2
READ_AHEAD_BYTES = 128 * 1024**2  # how far reads are hinted ahead (measured: 4x less is slower)


@dataclass(frozen=True)
class FileRange:
    """Bytes to copy as they are from a file: the writer hands them to the kernel
    (copy_file_range), so they never pass through this process."""

    path: Path
    offset: int
    nbytes: int

    def copy_to(self, out: BinaryIO) -> None:
        """Append the bytes to `out` (an unbuffered file), in the kernel when it can."""
        with open(self.path, "rb", buffering=0) as src:
            done = 0
            if hasattr(os, "copy_file_range"):
                try:
                    while done < self.nbytes:
                        n = os.copy_file_range(src.fileno(), out.fileno(), self.nbytes - done,
                                               self.offset + done)
                        if n == 0:
                            raise SafetensorsError(f"{self.path}: truncated")
                        done += n
                except OSError as e:
                    if done or e.errno not in _NO_KERNEL_COPY:
                        raise
            buf = bytearray(min(COPY_BLOCK, self.nbytes - done))
            src.seek(self.offset + done)
            while done < self.nbytes:
                n = src.readinto(memoryview(buf)[: min(len(buf), self.nbytes - done)])
                if not n:
                    raise SafetensorsError(f"{self.path}: truncated")
                write_all(out, memoryview(buf)[:n])
                done += n


_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}

# A tensor's bytes: one array or file range, or an iterable of them in order.
TensorSource = Callable[[TensorSpec], "np.ndarray | FileRange | Iterable[np.ndarray | FileRange]"]


def write_all(out: BinaryIO, data: memoryview) -> None:
    """Write every byte to an unbuffered file (a single write(2) may be partial)."""
    done = 0
    while done < len(data):
        done += out.write(data[done:])

class SafetensorsError(ValueError):
    """A safetensors file that is missing, truncated or malformed."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes live: its spec, the file, and the absolute byte offset."""

    spec: TensorSpec
    path: Path
    offset: int

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` of the first axis, as a fresh array of the dtype's storage type."""
        out = np.empty((stop - start, *self.spec.shape[1:]), dtype=DTYPES[self.spec.dtype])
        view = memoryview(out).cast("B")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start * self._row_bytes())
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise SafetensorsError(f"{self.path}: truncated inside {self.spec.name}")
                done += n
        return out

    def iter_rows(self, start: int, stop: int, chunk_bytes: int) -> Iterator[np.ndarray]:
        """Rows `start:stop` in consecutive slices of about `chunk_bytes` each; the kernel is
        asked to read about READ_AHEAD_BYTES ahead of the slice in use."""
        step = max(1, chunk_bytes // self._row_bytes())
        ahead = max(1, READ_AHEAD_BYTES // (step * self._row_bytes())) * step
        self._read_ahead(start, min(stop, start + ahead))
        for lo in range(start, stop, step):
            self._read_ahead(min(stop, lo + ahead), min(stop, lo + ahead + step))
            yield self.read_rows(lo, min(stop, lo + step))

    def file_ranges(self, start: int, stop: int, chunk_bytes: int) -> Iterator[FileRange]:
        """Rows `start:stop` as file ranges of about `chunk_bytes` each, to copy unchanged."""
        row_bytes = self._row_bytes()
        step = max(1, chunk_bytes // row_bytes)
        for lo in range(start, stop, step):
            hi = min(stop, lo + step)
            yield FileRange(self.path, self.offset + lo * row_bytes, (hi - lo) * row_bytes)

    def _row_bytes(self) -> int:
        return max(1, self.spec.nbytes // max(1, self.spec.shape[0]))

    def _read_ahead(self, start: int, stop: int) -> None:
        if stop > start and hasattr(os, "posix_fadvise"):
            row = self._row_bytes()
            with open(self.path, "rb", buffering=0) as f:
                os.posix_fadvise(f.fileno(), self.offset + start * row, (stop - start) * row,
                                 os.POSIX_FADV_WILLNEED)


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, after checking that the header and sizes agree."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(
                    f"{path}: corrupt safetensors header (claims {n} header bytes, "
                    f"file has {size})"
                )
            blob = f.read(n)
    except FileNotFoundError:
        raise SafetensorsError(f"{path}: no such file") from None
    try:
        header = json.loads(blob)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    base = 8 + n
    tensors: dict[str, StoredTensor] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(type(v) is int and v >= 0 for v in (*shape, lo, hi)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: corrupt header entry for {name}") from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise SafetensorsError(f"{path}: {name} has unsupported dtype {dtype}")
        spec = TensorSpec(name, dtype, shape)
        if hi - lo != spec.nbytes:
            raise SafetensorsError(
                f"{path}: corrupt header entry for {name} ({hi - lo} bytes for "
                f"{dtype}{list(shape)}, expected {spec.nbytes})"
            )
        end = max(end, hi)
        tensors[name] = StoredTensor(spec, Path(path), base + lo)
    if base + end > size:
        raise SafetensorsError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {base + end})"
        )
    return tensors


def plan_shards(specs: Iterable[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `max_bytes` (a larger one stands alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


def write_file(
    path: Path,
    specs: list[TensorSpec],
    source: TensorSource,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> None:
    """Write one safetensors file, asking `source` for each tensor's bytes in turn."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb", buffering=0) as f:
        write_all(f, memoryview(struct.pack("<Q", len(blob)) + blob))
        for spec in specs:
            data = source(spec)
            written = 0
            for item in [data] if isinstance(data, (np.ndarray, FileRange)) else data:
                if isinstance(item, FileRange):
                    item.copy_to(f)
                    written += item.nbytes
                    continue
                arr = np.ascontiguousarray(item)
                write_all(f, memoryview(arr).cast("B"))
                written += arr.nbytes
            if written != spec.nbytes:
                raise ValueError(
                    f"{spec.name}: got {written} bytes for {spec.dtype}{list(spec.shape)}, "
                    f"expected {spec.nbytes}"
                )
            if on_tensor is not None:
                on_tensor(spec)


def write_sharded(
    folder: Path,
    specs: list[TensorSpec],
    source: TensorSource,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> list[str]:
    """Write `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`."""
    shards = plan_shards(specs, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        write_file(folder / name, shard, source, metadata, on_tensor)
        weight_map.update({spec.name: name for spec in shard})
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in specs)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names
