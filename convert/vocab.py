"""The o200k_base vocabulary a converted folder needs to run offline, found and verified.

Hugging Face releases carry no `o200k_base.tiktoken`, but their `tokenizer.json` holds the same
byte-level BPE: `vocab_from_tokenizer_json` rebuilds the tiktoken file from it, byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from gptoss_mlx.chat.tokenizer import VOCAB_FILENAME, VOCAB_SHA256, VocabularyError
from gptoss_mlx.chat.tokenizer import read_vocab as tokenizer_vocab

from .source import ConvertError

TOKENIZER_JSON = "tokenizer.json"
# tiktoken's own download (and the key of its cache).
VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


def gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte (GPT-2's table), reversed:
    bytes that print as themselves keep their code point, the others take 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(extra)})
    return table


def vocab_from_tokenizer_json(path: str | Path) -> bytes:
    """The bytes of `o200k_base.tiktoken` (`base64(token) rank` lines) rebuilt from a Hugging
    Face `tokenizer.json`, checked against o200k_base's sha256. ConvertError (one line) when the
    file is unreadable or its vocabulary is not o200k_base."""
    path = Path(path)
    try:
        vocab = json.loads(path.read_bytes())["model"]["vocab"]
        if not isinstance(vocab, dict):
            raise TypeError
    except OSError as e:
        raise ConvertError(f"{path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError):
        raise ConvertError(f"{path}: not a Hugging Face tokenizer.json (no model.vocab)") from None
    decoder = gpt2_byte_decoder()
    try:
        lines = [base64.b64encode(bytes(decoder[c] for c in token)) + b" %d\n" % rank
                 for token, rank in sorted(vocab.items(), key=lambda kv: kv[1])]
    except (KeyError, TypeError):
        raise ConvertError(f"{path}: not a byte-level BPE vocabulary") from None
    data = b"".join(lines)
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise ConvertError(f"{path}: its vocabulary is not o200k_base (sha256 {digest[:12]}..., "
                           f"expected {VOCAB_SHA256[:12]}...)")
    return data


def read_vocab(path: str | Path) -> bytes:
    """The bytes of an `o200k_base.tiktoken` file, checked against its sha256."""
    try:
        return tokenizer_vocab(Path(path))
    except VocabularyError as e:
        raise ConvertError(str(e)) from None


def find_vocab(folders: list[Path], explicit: str | Path | None = None) -> bytes:
    """The verified o200k_base vocabulary: `explicit`, else the first of `folders` holding an
    `o200k_base.tiktoken` (one with the wrong sha256 is skipped) or a `tokenizer.json`, else
    tiktoken's cache or its download. ConvertError naming both remedies when all fail."""
    if explicit is not None:
        return read_vocab(explicit)
    skipped = []
    for folder in folders:
        if (folder / VOCAB_FILENAME).is_file():
            try:
                return read_vocab(folder / VOCAB_FILENAME)
            except ConvertError:
                skipped.append(str(folder / VOCAB_FILENAME))
        if (folder / TOKENIZER_JSON).is_file():
            return vocab_from_tokenizer_json(folder / TOKENIZER_JSON)
    try:
        return download_vocab()
    except ConvertError as e:
        reason = str(e)
    where = folders[0] if folders else "the source"
    note = f"; skipped {', '.join(skipped)} (wrong sha256)" if skipped else ""
    raise ConvertError(
        f"no o200k_base vocabulary: {where} has no {TOKENIZER_JSON} or {VOCAB_FILENAME}, and "
        f"{reason}{note}; pass --vocab PATH to a copy of {VOCAB_FILENAME}, or put the "
        f"release's {TOKENIZER_JSON} in {where}"
    )


def download_vocab() -> bytes:
    """o200k_base from tiktoken's cache, else tiktoken's download (needs the internet)."""
    from tiktoken.load import read_file_cached

    try:
        return read_file_cached(VOCAB_URL, VOCAB_SHA256)
    except Exception as e:  # offline (requests' ConnectionError, ...), a bad download
        raise ConvertError(f"tiktoken could not download it ({type(e).__name__})") from None
