"""The turn constraint's mask applied to logits, against llguidance's own numpy application.

Step by step through one turn (its mask changing, or staying the same over a run of text), in
every regime (few tokens allowed, few left out, neither), and for logits narrower than the
tokenizer's vocabulary (its mask words cover ids the model lacks) or wider (the model's
vocabulary padded past the tokenizer's): exactly the tokens llguidance allows stay finite, their
logits unchanged, in the logits' dtype.
"""

from __future__ import annotations

from pathlib import Path

import llguidance as llg
import llguidance.numpy as llg_np
import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx.chat.forcing import TurnConstraint, TurnSpec, llg_tokenizer
from gptoss_mlx.chat.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"note": {"type": "string"}, "temp": {"type": "number"}},
          "required": ["note", "temp"], "additionalProperties": False}
TURN = ('<|channel|>analysis<|message|>Let me think about it<|end|><|start|>assistant'
        '<|channel|>final<|message|>{"note":"Sunny and warm","temp":21.5}<|return|>')


@pytest.fixture(scope="module")
def tok(vocab_path: Path) -> Tokenizer:
    return Tokenizer(vocab_path)


@pytest.mark.parametrize("extra", [0, -16, 40], ids=["same", "model-narrower", "model-wider"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_exactly_the_tokens_llguidance_allows_stay_finite(tok: Tokenizer, extra: int,
                                                          dtype: mx.Dtype) -> None:
    width = tok.vocab_size + extra
    constraint = TurnConstraint(tok, TurnSpec(answer_schema=SCHEMA))
    oracle = llg.LLMatcher(llg_tokenizer(tok), llg.LLMatcher.grammar_from_lark(
        constraint._compiled.grammar), log_level=0)  # a matcher of its own, on the same grammar
    bitmask = llg_np.allocate_token_bitmask(1, tok.vocab_size)
    rng = np.random.default_rng(0)
    turn = tok.encode(TURN, allow_special=True)
    counts = []
    for i, token in enumerate(turn):
        llg_np.fill_next_token_bitmask(oracle, bitmask)
        applied = np.zeros((1, width), dtype=np.float32)
        llg_np.apply_token_bitmask_inplace(applied, bitmask)
        expected = np.isfinite(applied[0])
        logits = mx.array(rng.normal(size=(1, width)).astype(np.float32)).astype(dtype)
        out = constraint(turn[:i], logits)
        assert out.shape == (1, width) and out.dtype == dtype
        got, given = np.array(out.astype(mx.float32))[0], np.array(logits.astype(mx.float32))[0]
        assert np.array_equal(np.isfinite(got), expected), tok.decode(turn[:i])
        assert np.array_equal(got[expected], given[expected]), tok.decode(turn[:i])
        assert np.all(got[~expected] == -np.inf), tok.decode(turn[:i])
        counts.append(int(expected.sum()))
        assert oracle.consume_token(token), oracle.get_error()
    # every regime was met: a header or digits, free text, a JSON string
    assert min(counts) < 10 and max(counts) > width - 2000
    assert any(2000 < n < width - 2000 for n in counts)
