"""The tokenizer and generation files of a Hugging Face gpt-oss release, and how to make them.

A release folder carries, beside weights and config.json, the files below; a conversion copies
them unchanged. For a source without them (an `original/` folder, a synthetic checkpoint) they
are generated from the o200k_base vocabulary as the release has them: the byte-level BPE of
o200k_base with harmony's special tokens 199998..200018 at their ids, `PreTrainedTokenizerFast`
with bos `<|startoftext|>`, eos `<|return|>`, pad `<|endoftext|>`, and our harmony chat template.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from gptoss_mlx.chat.tokenizer import (
    CALL,
    ENDOFTEXT,
    NAMED_SPECIAL_TOKENS,
    O200K_PATTERN,
    RETURN,
    STARTOFTEXT,
    VOCAB_FILENAME,
)

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
RELEASE_FILES = (GENERATION_CONFIG, *TOKENIZER_FILES)  # what a release has besides its weights

ENDOFPROMPT = 200018  # o200k_base's own special token, the last of the release's added tokens
SPECIAL_TOKENS_MAP = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>",
                      "pad_token": "<|endoftext|>"}
GENERATION = {"bos_token_id": STARTOFTEXT, "do_sample": True,
              "eos_token_id": [RETURN, ENDOFTEXT, CALL], "pad_token_id": ENDOFTEXT}


def release_added_tokens() -> dict[int, str]:
    """The release tokenizer's added tokens by id: the harmony names, `<|endofprompt|>` at
    200018, `<|reserved_N|>` in between."""
    named = {i: name for name, i in NAMED_SPECIAL_TOKENS.items()}
    named[ENDOFPROMPT] = "<|endofprompt|>"
    return {i: named.get(i, f"<|reserved_{i}|>") for i in range(STARTOFTEXT, ENDOFPROMPT + 1)}


def chat_template() -> str:
    """Our harmony chat template (jinja), rendering as openai-harmony does."""
    return files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")


def hf_tokenizer(vocab: str | Path) -> Any:
    """A `tokenizers.Tokenizer` for o200k_harmony built from an `o200k_base.tiktoken` file,
    with the release's added tokens at their ids."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(vocab), pattern=O200K_PATTERN).converted()
    added = release_added_tokens()
    tok.add_special_tokens([AddedToken(added[i], special=True, normalized=False)
                            for i in sorted(added)])
    for i, name in added.items():
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"built tokenizer maps {name} to {tok.token_to_id(name)}, not {i}")
    return tok


@lru_cache(maxsize=1)
def _tokenizer_json(vocab: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / VOCAB_FILENAME).write_bytes(vocab)
        return hf_tokenizer(Path(tmp) / VOCAB_FILENAME).to_str()


def write_release_files(folder: Path, vocab: bytes) -> None:
    """Write the release's tokenizer and generation files into `folder`, built from the bytes
    of o200k_base.tiktoken (the tokenizer.json text is kept for the next call)."""
    folder = Path(folder)
    (folder / "tokenizer.json").write_text(_tokenizer_json(vocab), encoding="utf-8")
    template = chat_template()
    config = {
        "added_tokens_decoder": {
            str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, name in release_added_tokens().items()
        },
        **SPECIAL_TOKENS_MAP,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    _write_json(folder / GENERATION_CONFIG, GENERATION)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
