"""Where a model's tensors come from: a converted MLX folder, or a released checkpoint as it is.

    weights = open_weights("~/Downloads/gpt-oss-20b")   # or a converted folder, or a hub repo id
    weights.config, weights.specs()                     # ModelConfig; our tensors' specs
    arrays = weights.arrays()                           # our name -> lazy mx.array

A converted folder (ours or mlx-community's: its config.json has a "quantization" entry) is read
as stored. A released checkpoint (the Hugging Face root layout, OpenAI's `original/`, or a folder
holding both) is read through the converter's own plan (`plan_conversion`): each of our tensors
is a slice of a stored one, built lazily on `mx.load`, so the gate/up rows are de-interleaved,
the qkv rows split and the MXFP4 bytes viewed as uint32 while the loader evaluates the model
layer by layer; no conversion step and no second copy on disk. A Hugging Face repo id is
downloaded once into the hub cache (`convert.source.resolve`).

`arrays(shard)` gives one rank's share instead (see `sharding.cut`), read with plain reads of
just that part of each stored tensor (rows of an expert, blocks of a row), so no rank ever holds
a whole tensor it shares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from gptoss_mlx.config import ConfigError, ModelConfig
from gptoss_mlx.convert.converter import model_config, output_config, plan_conversion, side_folders
from gptoss_mlx.convert.safetensors_io import (
    DTYPES,
    SafetensorsError,
    StoredTensor,
    TensorSpec,
    read_header,
)
from gptoss_mlx.convert.source import ConvertError, Source, resolve
from gptoss_mlx.convert.stream import CHUNK_BYTES, Piece

from .sharding import Cut, Shard, cut


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded: the message names the folder and the tensors."""


@dataclass(frozen=True)
class ConvertedFolder:
    """An MLX folder: config.json with "quantization", `model*.safetensors` under our names."""

    folder: Path
    config: ModelConfig
    raw_config: dict[str, Any]

    @property
    def side_folders(self) -> list[Path]:
        """Folders that may hold the vocabulary (o200k_base.tiktoken, tokenizer.json)."""
        return [self.folder]

    def specs(self) -> list[TensorSpec]:
        """Every stored tensor, from the safetensors headers alone."""
        try:
            return [t.spec for f in self._files() for t in read_header(f).values()]
        except SafetensorsError as e:
            raise ModelLoadError(str(e)) from None

    def arrays(self, shard: Shard | None = None) -> dict[str, mx.array]:
        """Every stored tensor, lazily (read when evaluated); with `shard`, that rank's part of
        each, read now."""
        if shard is not None:
            return {name: _read_part(t, Piece(t, 0, t.spec.shape[0]), t.spec,
                                     cut(name, t.spec.shape, self.config, shard))
                    for name, t in self._stored().items()}
        weights: dict[str, mx.array] = {}
        for f in self._files():
            try:
                weights.update(mx.load(str(f)))
            except Exception as e:  # mlx raises bare RuntimeError/ValueError on a bad file
                raise ModelLoadError(f"{f}: cannot read safetensors ({e})") from None
        return weights

    def _stored(self) -> dict[str, StoredTensor]:
        try:
            return {n: t for f in self._files() for n, t in read_header(f).items()}
        except SafetensorsError as e:
            raise ModelLoadError(str(e)) from None

    def _files(self) -> list[Path]:
        files = sorted(self.folder.glob("model*.safetensors"))
        if not files:
            raise ModelLoadError(f"{self.folder}: no model*.safetensors files")
        return files


@dataclass(frozen=True)
class Release:
    """A released checkpoint, read through the converter's plan: our tensor -> stored slice."""

    source: Source
    config: ModelConfig
    plan: list[tuple[TensorSpec, Piece]]

    @property
    def folder(self) -> Path:
        return self.source.folder

    @property
    def raw_config(self) -> dict[str, Any]:
        """The config.json the converter would write for this checkpoint."""
        return output_config(self.source, self.config)

    @property
    def side_folders(self) -> list[Path]:
        """Folders that may hold the vocabulary (the release root too, for `original/`)."""
        return side_folders(self.source)

    def specs(self) -> list[TensorSpec]:
        """Our tensors, exactly as the converter would write them."""
        return [spec for spec, _ in self.plan]

    def arrays(self, shard: Shard | None = None) -> dict[str, mx.array]:
        """Our tensors as lazy slices of the stored ones: evaluating a layer reads each of its
        stored tensors once, and frees it once its slices are copied out. With `shard`, that
        rank's part of each, read now."""
        if shard is not None:
            return {spec.name: _read_part(piece.tensor, piece, spec,
                                          cut(spec.name, spec.shape, self.config, shard))
                    for spec, piece in self.plan}
        files: dict[Path, dict[str, mx.array]] = {}
        out = {}
        for spec, piece in self.plan:
            path = piece.tensor.path
            if path not in files:
                try:
                    files[path] = mx.load(str(path))
                except Exception as e:  # mlx raises bare RuntimeError/ValueError
                    raise ModelLoadError(f"{path}: cannot read safetensors ({e})") from None
            out[spec.name] = _sliced(files[path][piece.tensor.spec.name], spec, piece)
        return out  # `files` is dropped here, so no stored tensor outlives its slices


def _sliced(stored: mx.array, spec: TensorSpec, piece: Piece) -> mx.array:
    """Our tensor `spec` from `stored` as `piece` says (rows start:stop, and every other row
    of axis 1 for gate/up), with the MXFP4 bytes viewed as uint32 as the converter writes them."""
    a = stored[piece.start : piece.stop]
    if piece.parity is not None:
        a = mx.contiguous(a[:, piece.parity :: 2])
    if spec.dtype != piece.tensor.spec.dtype:  # the converter's one reinterpretation: U8 -> U32
        a = a.view(mx.uint32)
    return a.reshape(spec.shape)


def _read_part(stored: StoredTensor, piece: Piece, spec: TensorSpec, part: Cut) -> mx.array:
    """The part `part` of our tensor `spec`, which is `piece` of `stored`, read from the file."""
    shape = part.shape(spec.shape)
    dtype = _MX_DTYPES[spec.dtype]
    if part.zero:
        return mx.zeros(shape, dtype=dtype)
    index = [slice(piece.start, piece.stop)] + [slice(None)] * (len(stored.spec.shape) - 1)
    if piece.parity is not None:
        index[1] = slice(piece.parity, None, 2)
    if part.axis is not None:
        lo, hi = part.start, part.stop
        if part.axis == 0:
            index[0] = slice(piece.start + lo, piece.start + hi)
        elif part.axis == 1 and piece.parity is not None:  # every other stored row
            index[1] = slice(2 * lo + piece.parity, 2 * hi, 2)
        else:  # a stored [..., blocks, 16] U8 axis is our [..., blocks * 4] U32 one
            per = spec.shape[part.axis] // stored.spec.shape[part.axis]
            index[part.axis] = slice(lo // per, hi // per)
    try:
        data = _read_index(stored, index)
    except SafetensorsError as e:
        raise ModelLoadError(str(e)) from None
    data = np.ascontiguousarray(data).view(DTYPES[spec.dtype]).reshape(shape)
    out = mx.array(data)
    return out.view(dtype) if out.dtype != dtype else out


_MAX_ROW_READS = 1024  # a cut of axis 1 reads row by row up to this many rows (experts), else
# whole rows in chunks
_MX_DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "U8": mx.uint8,
              "I8": mx.int8, "U32": mx.uint32, "I32": mx.int32}


def _read_index(stored: StoredTensor, index: list[slice]) -> np.ndarray:
    """`stored[index]` with plain reads: the rows of axis 0 in `index[0]` (step 1) only; a cut
    of axis 1 reads each leading row's range alone; deeper cuts read whole rows a chunk at a
    time and keep their part."""
    rows, rest = index[0], index[1:]
    if all(s == slice(None) for s in rest):
        return stored.read_rows(rows.start, rows.stop)
    if all(s == slice(None) for s in rest[1:]) and rows.stop - rows.start <= _MAX_ROW_READS:
        inner = rest[0]
        shape = stored.spec.shape
        lo, hi, step = inner.indices(shape[1])
        row_bytes = stored.spec.nbytes // shape[0]
        parts = []
        for i in range(rows.start, rows.stop):
            sub = StoredTensor(TensorSpec(stored.spec.name, stored.spec.dtype, shape[1:]),
                               stored.path, stored.offset + i * row_bytes)
            parts.append(sub.read_rows(lo, hi)[::step])
        return np.stack(parts)
    chunks = [a[(slice(None), *rest)]
              for a in stored.iter_rows(rows.start, rows.stop, CHUNK_BYTES)]
    return np.concatenate(chunks)


ModelWeights = ConvertedFolder | Release


def open_weights(model: str | Path) -> ModelWeights:
    """The weights of a converted folder, a released checkpoint folder (either layout), or a
    Hugging Face repo id (downloaded once into the hub cache); nothing is read but config.json
    and the safetensors headers. Raises ModelLoadError with one line naming the folder."""
    folder = locate(model)
    raw = _converted_config(folder)
    if raw is not None:
        try:
            return ConvertedFolder(folder, ModelConfig.from_dict(raw), raw)
        except ConfigError as e:
            raise ModelLoadError(f"{folder}/config.json: {e}") from None
    try:
        source = resolve(folder)
        cfg = model_config(source)
        plan = plan_conversion(source, cfg)
    except ConvertError as e:
        raise ModelLoadError(str(e)) from None
    return Release(source, cfg, plan)  # without dense_bits the plan holds only Pieces


def locate(model: str | Path) -> Path:
    """A local folder as it is; a Hugging Face repo id downloaded (once) into the hub cache."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: not a folder (expected a model folder or a Hugging "
                                 "Face repo id)")
        return path
    try:
        return resolve(str(model)).folder
    except ConvertError as e:
        raise ModelLoadError(str(e)) from None


def _converted_config(folder: Path) -> dict[str, Any] | None:
    """config.json of a converted folder (it has "quantization"); None for a release."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        if (folder / "original" / "config.json").is_file():
            return None
        raise ModelLoadError(f"{folder}: no config.json (expected a converted MLX folder or a "
                             "released checkpoint)") from None
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError before it
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return raw if "quantization" in raw else None
