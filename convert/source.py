"""Find a released checkpoint: a local folder in either layout, or a Hugging Face repo id.

A source resolves to its layout (`hf` or `original`), its config.json dict and the location of
every tensor it stores, after checking that the files are complete and well-formed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .release_files import RELEASE_FILES
from .safetensors_io import SafetensorsError, StoredTensor, read_header

INDEX_NAME = "model.safetensors.index.json"
# What a Hugging Face download needs: the root layout's weights and config with the release's
# tokenizer and generation files; never original/ (the same weights again) or metal/.
HUB_PATTERNS = ["config.json", INDEX_NAME, "model*.safetensors", *RELEASE_FILES]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConvertError(Exception):
    """A conversion that cannot proceed; the message is one line naming what is wrong."""


@dataclass(frozen=True)
class Source:
    """A checkpoint on disk: its folder, layout, config.json dict and stored tensors."""

    folder: Path
    layout: str  # "hf" | "original"
    config: dict[str, Any]
    tensors: dict[str, StoredTensor]


def resolve(src: str | Path) -> Source:
    """Open a local checkpoint folder, or download a Hugging Face repo id first."""
    path = Path(src)
    if not path.exists():
        if isinstance(src, str) and _REPO_ID.match(src):
            path = download(src)
        else:
            raise ConvertError(f"{src}: no such folder (and not a Hugging Face repo id)")
    if not path.is_dir():
        raise ConvertError(f"{path}: not a folder")
    if _has_weights(path):
        return _open(path)
    if _has_weights(path / "original"):
        return _open(path / "original")
    raise ConvertError(
        f"{path}: no checkpoint found (expected config.json with {INDEX_NAME} or "
        "model*.safetensors, or an original/ folder with config.json and model.safetensors)"
    )


def download(repo_id: str) -> Path:
    """Download what a conversion or a run needs (`HUB_PATTERNS`) from the Hugging Face Hub
    into its cache (once); return the local snapshot folder."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, ...: one line, the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(
            f"cannot download {repo_id} from the Hugging Face Hub (offline or unknown repo?): "
            f"{first}"
        ) from None


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        (folder / INDEX_NAME).is_file() or any(folder.glob("model*.safetensors"))
    )


def _open(folder: Path) -> Source:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError before it
        raise ConvertError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{config_path}: expected a JSON object")
    if "quantization" in config:
        raise ConvertError(f"{config_path}: already an MLX folder (has \"quantization\"); "
                           "convert takes a released checkpoint")
    layout = "original" if "num_experts" in config and "num_local_experts" not in config else "hf"
    files, weight_map = _weight_files(folder)
    tensors: dict[str, StoredTensor] = {}
    try:
        for file in files:
            for name, stored in read_header(file).items():
                if name in tensors:
                    raise ConvertError(f"{name}: stored twice ({tensors[name].path.name}, "
                                       f"{file.name})")
                tensors[name] = stored
    except SafetensorsError as e:
        raise ConvertError(str(e)) from None
    _check_index(weight_map, tensors)
    return Source(folder, layout, config, tensors)


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The shards named by the index's weight_map (release names vary) and that map, else the
    globbed shards and an empty map."""
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        return sorted(folder.glob("model*.safetensors")), {}
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        if not all(isinstance(f, str) for f in files):
            raise TypeError("a shard name is not a string")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConvertError(f"{index_path}: not a safetensors index (no weight_map)") from None
    for name in files:
        if not (folder / name).is_file():
            raise ConvertError(f"{folder / name}: shard listed in {INDEX_NAME} is missing")
    return [folder / name for name in files], weight_map


def _check_index(weight_map: dict[str, str], tensors: dict[str, StoredTensor]) -> None:
    for name, file in weight_map.items():
        if name not in tensors:
            raise ConvertError(f"{name}: listed in {INDEX_NAME} under {file} but not stored there")
        if tensors[name].path.name != file:
            raise ConvertError(
                f"{name}: {INDEX_NAME} says {file}, found in {tensors[name].path.name}"
            )
