"""KV caches of long instruction prefixes kept on disk, so a restarted server skips their prefill.

Coding agents send the same system and developer messages (instructions, tool definitions: about
5,000 tokens for Codex CLI) before every conversation. When a prompt's instructions prefix (its
leading system and developer messages) has at least `min_tokens` tokens, the store keeps the
per-layer KV caches after that prefix in one safetensors file named by a hash of the model's
identity and the prefix's token ids:

- tensors `tokens` (the prefix, int32) and `layers.I.keys` / `layers.I.values` (the positions
  each layer holds: all for a full-attention layer, `[start, offset)` for a sliding one);
- metadata: format version, model identity, token count, prefix hash, per-layer state and a
  sha256 of every tensor's bytes.

Files are written to a temporary sibling and renamed (a reader never sees half a file), off the
worker thread from arrays it evaluated; the folder stays under `max_bytes`, the least recently
used files (by modification time, refreshed on every hit) going first. A file that fails any
check (truncated, corrupt, another model's, another format) is removed with a warning and the
prefix is prefilled as if it were absent.

    store = PromptStore(folder, model_identity(model), tokenizer)
    store.prepare(cache, prompt)   # restores the prefix, or has prefill save it when it passes
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gptoss_mlx.chat.tokenizer import CHANNEL, MESSAGE, START, Tokenizer
from gptoss_mlx.convert.safetensors_io import TensorSpec, write_file
from gptoss_mlx.generate import PromptCache, common_prefix
from gptoss_mlx.model.cache import SlidingKVCache, trimmable

FORMAT = "gptoss-mlx-prompt-cache/1"
SUFFIX = ".safetensors"
DEFAULT_MAX_BYTES = 4 * 2**30
DEFAULT_MIN_TOKENS = 1024
STALE_TEMP_SECONDS = 3600  # a temporary file this old was left by a killed writer
_FINGERPRINT = 16  # elements of each weight tensor (first and last) in the model identity

log = logging.getLogger("gptoss_mlx.prompt_store")


def model_identity(model: Any) -> str:
    """sha256 of what a KV cache depends on: the config, the experts backend, and every weight's
    name, dtype, shape and first and last elements (a different checkpoint, dtype or
    quantization gives another identity without hashing gigabytes)."""
    params = tree_flatten(model.parameters())
    edges = []
    for _, a in params:
        flat = a.reshape(-1)
        edges.append(mx.concatenate([flat[:_FINGERPRINT], flat[-_FINGERPRINT:]]))
    mx.eval(edges)
    h = hashlib.sha256(json.dumps(model.config.to_hf_dict(), sort_keys=True).encode())
    h.update(str(getattr(model, "experts_backend", "")).encode())
    for (name, a), edge in zip(params, edges, strict=True):
        h.update(f"\0{name}:{a.dtype}:{tuple(a.shape)}\0".encode())
        h.update(memoryview(edge))
    return h.hexdigest()


def instructions_length(prompt: Sequence[int], tokenizer: Tokenizer) -> int:
    """How many leading tokens of a harmony prompt are system and developer messages."""
    roles = [tokenizer.encode("system"), tokenizer.encode("developer")]
    for i, token in enumerate(prompt):
        if token != START:
            continue
        header = list(prompt[i + 1:i + 2 + max(map(len, roles))])
        if not any(header[:len(r)] == r and header[len(r):len(r) + 1] in ([MESSAGE], [CHANNEL])
                   for r in roles):
            return i
    return len(prompt)


def _prefix_hash(tokens: Sequence[int]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(tokens)}I", *tokens)).hexdigest()


# MLX dtype -> (safetensors dtype code, the MLX dtype numpy holds the same bytes as)
_CODES = {mx.bfloat16: ("BF16", mx.uint16), mx.float16: ("F16", mx.float16),
          mx.float32: ("F32", mx.float32), mx.int32: ("I32", mx.int32)}


def _host(a: mx.array) -> tuple[str, np.ndarray]:
    """(safetensors dtype code, a numpy copy of the bytes) of an MLX array."""
    if a.dtype not in _CODES:
        raise ValueError(f"cannot store {a.dtype} caches")
    code, same_bytes = _CODES[a.dtype]
    return code, np.array(a.view(same_bytes), copy=True)


def _digest(arrays: dict[str, Any]) -> str:
    """sha256 over the names and bytes of MLX or numpy arrays."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode() + b"\0")
        h.update(memoryview(arrays[name]))
    return h.hexdigest()


class EntryError(ValueError):
    """A stored file that cannot be used (the message says why)."""


class PromptStore:
    """The on-disk prompt caches of one model in `folder` (created if needed)."""

    def __init__(self, folder: str | os.PathLike[str], identity: str, tokenizer: Tokenizer, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, min_tokens: int = DEFAULT_MIN_TOKENS):
        self.folder = Path(folder)
        self.identity = identity
        self.tokenizer = tokenizer
        self.max_bytes = max_bytes
        self.min_tokens = max(1, min_tokens)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # eviction and the pending set
        self._pending: dict[str, threading.Thread] = {}
        self._remove_stale_temps()

    def path(self, prefix: Sequence[int]) -> Path:
        """The file holding the caches after `prefix`."""
        key = hashlib.sha256(f"{self.identity}\0{_prefix_hash(prefix)}".encode()).hexdigest()
        return self.folder / f"{key[:40]}{SUFFIX}"

    def prepare(self, cache: PromptCache, prompt: Sequence[int]) -> int:
        """Before `prompt` is prefilled into `cache`: when its instructions prefix is long enough
        and `cache` cannot reuse it (does not hold it, or its sliding layers cannot go back to
        it), restore it from disk, or else have prefill save it when it gets there. Returns the
        tokens restored (0: none)."""
        cache.checkpoint = None
        n = instructions_length(prompt, self.tokenizer)
        if n < self.min_tokens or n >= len(prompt):
            return 0
        keep = min(common_prefix(cache.tokens, prompt), len(prompt) - 1)
        if keep >= n and trimmable(cache.layers) >= len(cache.tokens) - keep:
            return 0  # the cache holds the prefix and can go back to it
        prefix = list(prompt[:n])
        if self.restore(cache, prefix):
            return n
        cache.checkpoint = (n, self.save)
        return 0

    def restore(self, cache: PromptCache, prefix: Sequence[int]) -> bool:
        """Fill `cache` with the stored caches after `prefix`; False (cache unchanged) if none
        is stored or the file fails its checks (then it is removed with a warning)."""
        path = self.path(prefix)
        if not path.is_file():
            return False
        try:
            layers = self._read(path, prefix, cache.model)
        except (EntryError, OSError, RuntimeError, ValueError) as exc:
            if not path.exists():  # evicted by another process meanwhile
                return False
            log.warning("prompt cache %s ignored and removed: %s", path, exc)
            path.unlink(missing_ok=True)
            return False
        cache.layers, cache.tokens = layers, list(prefix)
        cache.checkpoint = None
        try:
            os.utime(path)  # most recently used
        except OSError:
            pass
        log.info("prompt cache: %d tokens restored from %s", len(prefix), path)
        return True

    def save(self, cache: PromptCache) -> None:
        """Store what `cache` holds (evaluated here, written by a background thread)."""
        tokens = list(cache.tokens)
        path = self.path(tokens)
        with self._lock:
            if path.name in self._pending or path.exists():
                return
        arrays = {"tokens": mx.array(tokens, dtype=mx.int32)}
        states = []
        for i, layer in enumerate(cache.layers):
            if layer.keys is None or layer.offset != len(tokens):
                return  # not in step with its tokens (cannot happen after a prefill chunk)
            held = layer.offset - getattr(layer, "start", 0)
            arrays[f"layers.{i}.keys"] = mx.contiguous(layer.keys[..., :held, :])
            arrays[f"layers.{i}.values"] = mx.contiguous(layer.values[..., :held, :])
            states.append(_state(layer))
        # numpy copies made here: the writer thread then needs no MLX call (the worker thread
        # is MLX's only user)
        host = {name: _host(a) for name, a in arrays.items()}
        size = sum(a.nbytes for _, a in host.values())
        if size > self.max_bytes:
            log.info("prompt cache: %d tokens (%d bytes) exceed the %d-byte budget; not stored",
                     len(tokens), size, self.max_bytes)
            return
        metadata = {"format": FORMAT, "model": self.identity, "tokens": str(len(tokens)),
                    "prefix": _prefix_hash(tokens), "layers": json.dumps(states)}
        writer = threading.Thread(target=self._write, args=(path, host, metadata, size),
                                  name="gptoss-prompt-store")  # not a daemon: exit waits for it
        with self._lock:
            self._pending[path.name] = writer
        writer.start()

    def flush(self) -> None:
        """Wait for the files being written."""
        while True:
            with self._lock:
                writers = list(self._pending.values())
            if not writers:
                return
            for w in writers:
                w.join()

    def entries(self) -> list[Path]:
        """The stored files, least recently used first."""
        found = []
        for p in self.folder.glob(f"*{SUFFIX}"):
            try:
                found.append((p.stat().st_mtime, p))
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
        return [p for _, p in sorted(found)]

    def _write(self, path: Path, arrays: dict[str, tuple[str, np.ndarray]],
               metadata: dict[str, str], size: int) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            metadata["digest"] = _digest({name: a for name, (_, a) in arrays.items()})
            self._evict(room=size)
            specs = [TensorSpec(name, code, a.shape) for name, (code, a) in arrays.items()]
            write_file(tmp, specs, lambda spec: arrays[spec.name][1], metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._evict(room=0)
            log.info("prompt cache: %s tokens stored in %s", metadata["tokens"], path)
        except (OSError, ValueError) as exc:  # a full disk, a permission
            log.warning("prompt cache: could not write %s: %s", path, exc)
        finally:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._pending.pop(path.name, None)

    def _evict(self, room: int) -> None:
        """Remove least recently used files until they and `room` more bytes fit the budget."""
        with self._lock:
            files = []
            for p in self.entries():
                try:
                    files.append((p, p.stat().st_size))
                except FileNotFoundError:
                    continue
            total = sum(s for _, s in files) + room
            for p, s in files:
                if total <= self.max_bytes:
                    break
                p.unlink(missing_ok=True)
                total -= s
                log.info("prompt cache: evicted %s (budget %d bytes)", p, self.max_bytes)

    def _read(self, path: Path, prefix: Sequence[int], model: Any) -> list[Any]:
        """The layers stored in `path` for `prefix`, checked against `model`'s fresh ones."""
        arrays, meta = mx.load(str(path), return_metadata=True)
        if meta.get("format") != FORMAT:
            raise EntryError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("model") != self.identity:
            raise EntryError("written for another model (or weights, dtype, experts backend)")
        if meta.get("tokens") != str(len(prefix)) or meta.get("prefix") != _prefix_hash(prefix):
            raise EntryError("holds another token prefix")
        mx.eval(list(arrays.values()))
        if meta.get("digest") != _digest(arrays):
            raise EntryError("its tensors do not match their sha256 (corrupt)")
        if arrays["tokens"].tolist() != list(prefix):
            raise EntryError("holds another token prefix")
        states = json.loads(meta["layers"])
        fresh = model.make_cache()
        heads = (model.config.num_key_value_heads, model.config.head_dim)
        if len(states) != len(fresh):
            raise EntryError(f"{len(states)} layers, the model has {len(fresh)}")
        for i, (layer, state) in enumerate(zip(fresh, states, strict=True)):
            keys, values = arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"]
            if (keys.shape != values.shape or keys.ndim != 4 or keys.shape[0] != 1
                    or (keys.shape[1], keys.shape[3]) != heads or keys.dtype != values.dtype
                    or not mx.issubdtype(keys.dtype, mx.floating)):
                raise EntryError(f"layer {i} keys {keys.shape} {keys.dtype} / values "
                                 f"{values.shape} {values.dtype} do not fit the model's "
                                 f"{heads[0]} heads of {heads[1]}")
            _restore(layer, state, keys, values, len(prefix), i)
        return fresh

    def _remove_stale_temps(self) -> None:
        now = time.time()
        for p in self.folder.glob(f".*{SUFFIX}.*.tmp"):
            try:
                if now - p.stat().st_mtime > STALE_TEMP_SECONDS:
                    p.unlink()
            except FileNotFoundError:
                continue


def _state(layer: Any) -> dict[str, Any]:
    if isinstance(layer, SlidingKVCache):
        return {"kind": "sliding", "window": layer.window, "start": layer.start,
                "offset": layer.offset}
    return {"kind": "full", "start": 0, "offset": layer.offset}


def _restore(layer: Any, state: dict[str, Any], keys: mx.array, values: mx.array, n: int,
             i: int) -> None:
    """Put a stored layer state into the model's fresh `layer`, checking that it fits it."""
    sliding = isinstance(layer, SlidingKVCache)
    if state.get("kind") != ("sliding" if sliding else "full"):
        raise EntryError(f"layer {i} is {state.get('kind')!r}, the model's is "
                         f"{'sliding' if sliding else 'full'}")
    if sliding and state.get("window") != layer.window:
        raise EntryError(f"layer {i} has window {state.get('window')}, the model's is "
                         f"{layer.window}")
    start, offset = int(state.get("start", -1)), int(state.get("offset", -1))
    if offset != n or not 0 <= start < offset or (start and not sliding):
        raise EntryError(f"layer {i} holds positions [{start}, {offset}) for {n} tokens")
    if keys.shape[2] != offset - start:
        raise EntryError(f"layer {i} holds {keys.shape[2]} positions, not {offset - start}")
    layer.keys, layer.values, layer.offset = keys, values, offset
    if sliding:
        layer.start = start

