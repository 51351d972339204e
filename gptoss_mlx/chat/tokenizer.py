"""The o200k_harmony tokenizer, built offline from the `o200k_base.tiktoken` file in a model folder.

gpt-oss uses tiktoken's `o200k_harmony`: the o200k_base byte-pair ranks plus the harmony special
tokens (`<|start|>` 200006, `<|channel|>` 200005, ...), with every other id from 199998 up to
201087 a `<|reserved_N|>` token. tiktoken would download the ranks; here they come from the model
folder, so nothing touches the network.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import tempfile
import threading
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken
from tiktoken.load import load_tiktoken_bpe

if TYPE_CHECKING:
    from collections.abc import Iterable

    from openai_harmony import HarmonyEncoding

VOCAB_FILENAME = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_SIZE = 201088
TOKENIZER_JSON = "tokenizer.json"
# Where a vocabulary derived from a release's tokenizer.json is kept (see `derived_vocab`).
DERIVED_VOCAB = Path(tempfile.gettempdir()) / "gptoss-mlx-vocab" / VOCAB_FILENAME

# o200k_base's pre-tokenisation regex (tiktoken_ext.openai_public.o200k_base).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012

NAMED_SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": STARTOFTEXT,
    "<|endoftext|>": ENDOFTEXT,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|call|>": CALL,
}

# Sampling ends on these; `<|end|>` only closes one message of a turn, so it is not among them.
STOP_TOKENS: frozenset[int] = frozenset({RETURN, CALL, ENDOFTEXT})


def harmony_special_tokens() -> dict[str, int]:
    """All o200k_harmony special tokens: the named ones, and `<|reserved_N|>` for the other ids."""
    named_ids = set(NAMED_SPECIAL_TOKENS.values())
    reserved = {
        f"<|reserved_{i}|>": i for i in range(STARTOFTEXT, VOCAB_SIZE) if i not in named_ids
    }
    return {**NAMED_SPECIAL_TOKENS, **reserved}


class VocabularyError(ValueError):
    """The vocabulary file is missing or is not o200k_base."""


def read_vocab(path: Path) -> bytes:
    """The bytes of an `o200k_base.tiktoken` file, checked against its sha256
    (VocabularyError, one line, when it is missing or another vocabulary)."""
    if not path.is_file():
        raise VocabularyError(f"{path}: vocabulary file not found")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise VocabularyError(f"{path}: not the o200k_base vocabulary (sha256 {digest[:12]}..., "
                              f"expected {VOCAB_SHA256[:12]}...)")
    return data


class Tokenizer:
    """o200k_harmony over a local vocabulary file, plus the harmony renderer that shares it."""

    def __init__(self, vocab_path: str | os.PathLike[str]):
        path = Path(vocab_path)
        read_vocab(path)  # one clear line for a missing or foreign file
        self.vocab_path = path
        self.encoding = tiktoken.Encoding(
            name="o200k_harmony",
            pat_str=O200K_PATTERN,
            mergeable_ranks=load_tiktoken_bpe(str(path)),
            special_tokens=harmony_special_tokens(),
        )
        self.stop_tokens = STOP_TOKENS

    @property
    def vocab_size(self) -> int:
        """Number of token ids (201088)."""
        return self.encoding.n_vocab

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token text is plain text unless `allow_special`."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (special tokens as their `<|...|>` text, bad UTF-8 replaced)."""
        return self.encoding.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids`."""
        return self.encoding.decode_bytes(list(ids))

    def is_special(self, token: int) -> bool:
        """True for the harmony special and reserved ids (199998 and up)."""
        return token >= STARTOFTEXT

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental UTF-8 decoder over this vocabulary."""
        return StreamDecoder(self)

    @cached_property
    def harmony(self) -> HarmonyEncoding:
        """openai-harmony's `HarmonyGptOss` encoding, loaded from this vocabulary's folder."""
        return _load_harmony(self.vocab_path.parent)


class StreamDecoder:
    """Turns token ids into text deltas, holding back bytes of a character split across tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        """Feed one token; return the newly complete text (may be empty)."""
        return self._utf8.decode(self._tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        """Return whatever is held back (replacing bytes that never completed a character)."""
        return self._utf8.decode(b"", final=True)


_HARMONY_LOCK = threading.Lock()
_HARMONY_CACHE: dict[Path, HarmonyEncoding] = {}


def _load_harmony(vocab_dir: Path) -> HarmonyEncoding:
    """Load openai-harmony's gpt-oss encoding with its vocabulary read from `vocab_dir`."""
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    key = vocab_dir.resolve()
    with _HARMONY_LOCK:
        if key not in _HARMONY_CACHE:
            previous = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(key)
            try:
                _HARMONY_CACHE[key] = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
            finally:
                if previous is None:
                    del os.environ["TIKTOKEN_ENCODINGS_BASE"]
                else:
                    os.environ["TIKTOKEN_ENCODINGS_BASE"] = previous
        return _HARMONY_CACHE[key]


def load_tokenizer(*model_dirs: str | os.PathLike[str]) -> Tokenizer | None:
    """The tokenizer of a model whose side files are in `model_dirs` (a converted folder; a
    release's folder and, for `original/`, its root): their `o200k_base.tiktoken`, else one
    derived from their `tokenizer.json`; None when they hold neither.

    Raises VocabularyError when the vocabulary there is not o200k_base.
    """
    folders = [Path(d) for d in model_dirs]
    for folder in folders:
        if (folder / VOCAB_FILENAME).is_file():
            return Tokenizer(folder / VOCAB_FILENAME)
    for folder in folders:
        if (folder / TOKENIZER_JSON).is_file():
            return Tokenizer(derived_vocab(folder / TOKENIZER_JSON))
    return None


def derived_vocab(tokenizer_json: Path) -> Path:
    """`o200k_base.tiktoken` derived from a release's `tokenizer.json`, kept in one cache file
    (its bytes are fixed by VOCAB_SHA256, so every model shares it) and reused."""
    cached = DERIVED_VOCAB.is_file() and hashlib.sha256(DERIVED_VOCAB.read_bytes()).hexdigest()
    if cached == VOCAB_SHA256:
        return DERIVED_VOCAB
    from gptoss_mlx.convert.source import ConvertError
    from gptoss_mlx.convert.vocab import vocab_from_tokenizer_json  # the derivation (issue 11)

    try:
        data = vocab_from_tokenizer_json(tokenizer_json)
    except ConvertError as e:
        raise VocabularyError(str(e)) from None
    DERIVED_VOCAB.parent.mkdir(parents=True, exist_ok=True)
    tmp = DERIVED_VOCAB.with_name(f".{VOCAB_FILENAME}.{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(DERIVED_VOCAB)
    return DERIVED_VOCAB
