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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from gptoss_mlx.config import ConfigError, ModelConfig
from gptoss_mlx.convert.converter import model_config, output_config, plan_conversion, side_folders
from gptoss_mlx.convert.safetensors_io import SafetensorsError, TensorSpec, read_header
from gptoss_mlx.convert.source import ConvertError, Source, resolve
from gptoss_mlx.convert.stream import Piece


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

    def arrays(self) -> dict[str, mx.array]:
        """Every stored tensor, lazily (read when evaluated)."""
        weights: dict[str, mx.array] = {}
        for f in self._files():
            try:
                weights.update(mx.load(str(f)))
            except Exception as e:  # mlx raises bare RuntimeError/ValueError on a bad file
                raise ModelLoadError(f"{f}: cannot read safetensors ({e})") from None
        return weights

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

    def arrays(self) -> dict[str, mx.array]:
        """Our tensors as lazy slices of the stored ones: evaluating a layer reads each of its
        stored tensors once, and frees it once its slices are copied out."""
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
