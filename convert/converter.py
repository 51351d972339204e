"""Convert a released gpt-oss checkpoint into an MLX model folder, losslessly and streaming.

Every output tensor is a byte-exact copy of a slice of a source tensor: the MXFP4 expert blocks
are reinterpreted as uint32 (never requantized), the interleaved gate/up rows are split into two
tensors, and the `original/` layout's fused qkv rows are split into q, k and v. Bytes are copied
file to file or a few MB at a time (see `stream`), into a temporary sibling folder renamed at
the end. The release's tokenizer and generation files travel unchanged (see `release_files`), and
the o200k_base vocabulary our runtime reads is rebuilt from its tokenizer.json (see `vocab`).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptoss_mlx.chat.tokenizer import VOCAB_FILENAME, VOCAB_SIZE
from gptoss_mlx.config import ConfigError, ModelConfig

from .dense import QuantizedPiece, bits_for, config_entries, quantizable, quantized_specs
from .layout import hf_specs, mlx_specs, original_specs, original_to_hf, qkv_rows
from .release_files import GENERATION_CONFIG, RELEASE_FILES, write_release_files
from .safetensors_io import FileRange, SafetensorsError, TensorSpec, write_sharded
from .source import ConvertError, Source, resolve
from .staging import check_destination, staged_folder
from .stream import Piece, TensorStream
from .vocab import find_vocab

MAX_SHARD_BYTES = 5 * 10**9
QUANTIZATION = {"group_size": 32, "bits": 4, "mode": "mxfp4"}


@dataclass(frozen=True)
class ConvertStats:
    """What a conversion wrote."""

    tensors: int
    bytes: int
    parameters: int
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(1, self.parameters)


def convert(
    src: str | Path,
    dst: str | Path,
    vocab: str | Path | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = True,
    dense_bits: int | None = None,
) -> ConvertStats:
    """Convert the checkpoint at `src` (folder in either released layout, or a Hugging Face repo
    id) into the MLX folder `dst`. Raises ConvertError with a one-line message on bad input.

    Lossless by default; `dense_bits` (8 or 4) quantizes the dense weights (see `dense`)."""
    if dense_bits not in (None, 4, 8):
        raise ConvertError(f"dense_bits={dense_bits}: expected 8 or 4 (or none, lossless)")
    started = time.perf_counter()
    dst = Path(dst)
    check_destination(dst, force)  # before any download
    source = resolve(src)
    if source.folder.resolve().is_relative_to(dst.resolve()):
        raise ConvertError(f"{dst}: must not be or contain the source folder {source.folder}")
    cfg = model_config(source)
    plan = plan_conversion(source, cfg, dense_bits)
    folders = side_folders(source)
    vocab_bytes = None  # before writing anything
    if cfg.vocab_size >= VOCAB_SIZE:
        vocab_bytes = find_vocab(folders, vocab)
    elif progress:
        print(f"note: vocab_size {cfg.vocab_size} is below o200k_harmony's {VOCAB_SIZE} token "
              "ids (a test model): no tokenizer written", file=sys.stderr)

    specs = [spec for spec, _ in plan]
    total = sum(s.nbytes for s in specs)
    try:
        with staged_folder(dst, force) as tmp, tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
            disable=not progress, file=sys.stderr, dynamic_ncols=True,
        ) as bar:
            stream = TensorStream(plan)

            def source_of(spec: TensorSpec) -> Iterator[np.ndarray | FileRange]:
                bar.set_postfix_str(spec.name, refresh=False)
                for chunk in stream(spec):
                    yield chunk  # the writer writes it before asking for the next one
                    bar.update(chunk.nbytes)

            write_sharded(tmp, specs, source_of, max_shard_bytes, metadata={"format": "mlx"})
            _write_json(tmp / "config.json", output_config(source, cfg, dense_bits))
            copy_release_files(folders, tmp, vocab_bytes)
    except SafetensorsError as e:
        raise ConvertError(str(e)) from None
    except OSError as e:  # an unwritable DST (its parent a file, no permission, disk full, ...)
        raise ConvertError(os_error_line(e, dst)) from None
    stats = ConvertStats(len(specs), total, _parameters(mlx_specs(cfg)),
                         time.perf_counter() - started)
    if progress:
        print(
            f"converted {source.folder} ({source.layout} layout) -> {dst}: {stats.tensors} "
            f"tensors, {stats.bytes / 1e9:.3f} GB, {stats.parameters / 1e6:,.1f} M weights, "
            f"{stats.bits_per_weight:.2f} bits per weight, {stats.seconds:.1f} s",
            file=sys.stderr,
        )
    return stats


def plan_conversion(
    source: Source, cfg: ModelConfig, dense_bits: int | None = None
) -> list[tuple[TensorSpec, Piece | QuantizedPiece]]:
    """Each output tensor with the source slice it copies (or quantizes, with `dense_bits`),
    after checking the source's tensors against the layout its config describes."""
    expected = hf_specs(cfg) if source.layout == "hf" else original_specs(cfg)
    _check_tensors(source, expected)
    by_hf = _hf_pieces(source, cfg)
    plan = []
    for spec in mlx_specs(cfg):
        if dense_bits and quantizable(spec):
            bits = bits_for(spec.name, dense_bits)
            plan += [(q, QuantizedPiece(by_hf[spec.name], bits, part))
                     for part, q in enumerate(quantized_specs(spec, bits))]
            continue
        if ".mlp.experts." not in spec.name:
            plan.append((spec, by_hf[spec.name]))
            continue
        stem, proj, leaf = spec.name.rsplit(".", 2)
        kind = {"weight": "blocks", "scales": "scales", "bias": "bias"}[leaf]
        fused = "down_proj" if proj == "down_proj" else "gate_up_proj"
        piece = by_hf[f"{stem}.{fused}_{kind}"]
        parity = {"gate_proj": 0, "up_proj": 1}.get(proj)
        plan.append((spec, Piece(piece.tensor, piece.start, piece.stop, parity)))
    return plan


def output_config(source: Source, cfg: ModelConfig,
                  dense_bits: int | None = None) -> dict[str, Any]:
    """The MLX folder's config.json: the Hugging Face config, with mlx-lm's quantization entry
    (plus per-module entries for quantized dense weights) in place of quantization_config."""
    out = dict(source.config) if source.layout == "hf" else cfg.to_hf_dict()
    out.pop("quantization_config", None)
    out["quantization"] = dict(QUANTIZATION)
    if dense_bits:
        out["quantization"].update(config_entries(mlx_specs(cfg), dense_bits))
    return out


def model_config(source: Source) -> ModelConfig:
    """The source's config.json as a ModelConfig; ConvertError naming the file otherwise."""
    try:
        return ModelConfig.from_dict(source.config)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConvertError(f"{source.folder / 'config.json'}: {e}") from None


def _check_tensors(source: Source, expected: list[TensorSpec]) -> None:
    names = {s.name for s in expected}
    for spec in expected:
        stored = source.tensors.get(spec.name)
        if stored is None:
            raise ConvertError(
                f"{source.folder}: missing tensor {spec.name} "
                f"(expected {_fmt(spec)} from config.json)"
            )
        if stored.spec != spec:
            raise ConvertError(
                f"{stored.path}: tensor {spec.name} is {_fmt(stored.spec)}, expected {_fmt(spec)} "
                "from config.json"
            )
    for name, stored in source.tensors.items():
        if name not in names:
            raise ConvertError(f"{stored.path}: unexpected tensor {name} "
                               f"({_fmt(stored.spec)}) for a {source.layout} checkpoint")


def _hf_pieces(source: Source, cfg: ModelConfig) -> dict[str, Piece]:
    """Every Hugging Face layout tensor as a slice of a stored tensor."""
    if source.layout == "hf":
        return {n: Piece(t, 0, t.spec.shape[0]) for n, t in source.tensors.items()}
    out = {}
    for name, t in source.tensors.items():
        hf = original_to_hf(name)
        if hf is not None:
            out[hf] = Piece(t, 0, t.spec.shape[0])
            continue
        layer, leaf = name.split(".")[1], name.rsplit(".", 1)[1]  # block.N.attn.qkv.{weight,bias}
        for proj, lo, hi in qkv_rows(cfg):
            out[f"model.layers.{layer}.self_attn.{proj}_proj.{leaf}"] = Piece(t, lo, hi)
    return out


def copy_release_files(folders: list[Path], dst: Path, vocab: bytes | None) -> None:
    """Write `vocab` (o200k_base.tiktoken's bytes) and copy the release's tokenizer and
    generation files into `dst` unchanged, each from the first side folder holding it; a source
    without a tokenizer.json (an `original/` folder) gets them generated from `vocab` first, so
    every converted folder is complete. Without `vocab`, only the generation config."""
    if vocab is None:
        names: tuple[str, ...] = (GENERATION_CONFIG,)
    else:
        (dst / VOCAB_FILENAME).write_bytes(vocab)
        if not any((f / "tokenizer.json").is_file() for f in folders):
            write_release_files(dst, vocab)
        names = RELEASE_FILES
    for name in names:
        found = next((f / name for f in folders if (f / name).is_file()), None)
        if found is not None:
            shutil.copyfile(found, dst / name)


def side_folders(source: Source) -> list[Path]:
    """Folders whose side files (tokenizer, vocabulary, generation config) belong to this
    checkpoint."""
    if source.layout == "original" and source.folder.name == "original":
        return [source.folder, source.folder.parent]
    return [source.folder]


def _parameters(specs: list[TensorSpec]) -> int:
    """Weights of the lossless layout: two per packed MXFP4 byte, one per bf16 value."""
    total = 0
    for s in specs:
        if s.dtype == "U32":
            total += 2 * s.nbytes
        elif s.dtype != "U8":
            total += s.nbytes // 2
    return total


def os_error_line(e: OSError, path: Path) -> str:
    """One line for a failed file operation: the file it names (else `path`) and the reason."""
    return f"{e.filename or path}: {e.strerror or e}"


def _fmt(spec: TensorSpec) -> str:
    return f"{spec.dtype}{list(spec.shape)}"


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
