"""The MLX model against Hugging Face transformers' GptOssForCausalLM (torch CPU, float32).

Random checkpoints in both released layouts, at odd shapes, with sequences that cross small
sliding windows many times; full forwards, prefill-then-decode through the KV caches, trimming
a cache after its sliding layers dropped old positions, and the mlx-community folder format.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

import gptoss_mlx
from gptoss_mlx.convert import convert
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint
from gptoss_mlx.model.cache import offset, trim_to, trimmable
from gptoss_mlx.model.experts import SORT_MIN_PAIRS

SEQ = 160
F32_TOL = 5e-4  # max |logit difference| / max |logit|
SHAPES = {
    # 5 experts, 1 kv head, 3 q heads, head_dim 32, vocab 1003, intermediate != hidden
    "odd": dict(vocab_size=1003, hidden_size=64, intermediate_size=96, num_local_experts=5,
                num_experts_per_tok=4, head_dim=32, num_attention_heads=3,
                num_key_value_heads=1, sliding_window=16, num_hidden_layers=3),
    # head_dim 64 as released, 8 experts, window 8
    "hd64": dict(vocab_size=1000, hidden_size=64, intermediate_size=64, num_local_experts=8,
                 num_experts_per_tok=4, head_dim=64, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=8, num_hidden_layers=2),
}
SEEDS = {"odd": 3, "hd64": 4}
# Edge shapes a config.json may ask for, checked by full and cached forwards (fewer tests each).
EDGE_SHAPES = {
    # one expert per token (the sorted-experts path summed over a size-1 axis and crashed)
    "top1": dict(vocab_size=1000, hidden_size=64, intermediate_size=64, num_local_experts=4,
                 num_experts_per_tok=1, head_dim=16, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=16, num_hidden_layers=2),
    # every expert for every token, a single expert; one layer (sliding), one head of one kv head
    "all-experts": dict(vocab_size=1000, hidden_size=32, intermediate_size=32,
                        num_local_experts=3, num_experts_per_tok=3, head_dim=16,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=8,
                        num_hidden_layers=1),
    "one-expert": dict(vocab_size=1000, hidden_size=32, intermediate_size=64,
                       num_local_experts=1, num_experts_per_tok=1, head_dim=8,
                       num_attention_heads=1, num_key_value_heads=1, sliding_window=4,
                       num_hidden_layers=2),
    # one full-attention layer only, q heads == kv heads
    "one-full-layer": dict(vocab_size=1000, hidden_size=32, intermediate_size=32,
                           num_local_experts=2, num_experts_per_tok=2, head_dim=16,
                           num_attention_heads=2, num_key_value_heads=2, sliding_window=8,
                           num_hidden_layers=1, layer_types=["full_attention"]),
}
SEEDS.update({"top1": 5, "all-experts": 6, "one-expert": 7, "one-full-layer": 8})


class Case:
    """A random checkpoint in both layouts, converted from each, with its transformers oracle."""

    def __init__(self, root: Path, shape: str):
        self.cfg = tiny_config(**{**SHAPES, **EDGE_SHAPES}[shape])
        src = write_checkpoint(root / "src", self.cfg, layout="both", seed=SEEDS[shape])
        self.dirs = {"hf": root / "mlx-hf", "original": root / "mlx-original"}
        convert(src, self.dirs["hf"], progress=False)
        convert(src / "original", self.dirs["original"], progress=False)
        self.src = src
        self.ref = transformers.GptOssForCausalLM.from_pretrained(
            src, dtype=torch.float32,
            quantization_config=transformers.Mxfp4Config(dequantize=True))
        self.ref.eval()
        rng = np.random.default_rng(SEEDS[shape])
        self.tokens = rng.integers(0, self.cfg["vocab_size"], size=(1, SEQ))
        self.expected = reference_logits(self.ref, self.tokens)


def reference_logits(ref, tokens: np.ndarray) -> np.ndarray:
    """transformers' logits [B, T, V] for `tokens` (float32)."""
    with torch.no_grad():
        return ref(torch.tensor(tokens)).logits.float().numpy()


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def run(model, tokens: np.ndarray, cache=None, last_only: bool = False) -> np.ndarray:
    out = model(mx.array(tokens, dtype=mx.int32), cache=cache, last_only=last_only)
    return np.array(out.astype(mx.float32))


def prefill_then_decode(model, tokens: np.ndarray, cache, chunks: list[int]) -> np.ndarray:
    """Feed `tokens` through `cache`: the given chunk sizes first, then one token at a time."""
    outs, pos = [], 0
    for n in chunks:
        outs.append(run(model, tokens[:, pos:pos + n], cache))
        pos += n
    while pos < tokens.shape[1]:
        outs.append(run(model, tokens[:, pos:pos + 1], cache))
        pos += 1
    return np.concatenate(outs, axis=1)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def case(request, tmp_path_factory) -> Case:
    return Case(tmp_path_factory.mktemp(f"parity-{request.param}"), request.param)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_float32_full_forward_matches_transformers(case: Case, layout: str) -> None:
    model, _ = gptoss_mlx.load(case.dirs[layout], dtype="float32", experts="mlx")
    got = run(model, case.tokens)
    assert got.shape == case.expected.shape
    assert rel_error(got, case.expected) <= F32_TOL


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_float32_cached_decode_matches_transformers(case: Case, layout: str) -> None:
    model, _ = gptoss_mlx.load(case.dirs[layout], dtype="float32", experts="mlx")
    # A small slack and compaction step: the sliding caches drop old positions many times.
    cache = model.make_cache(slack=3, compact_step=5)
    got = prefill_then_decode(model, case.tokens, cache, chunks=[23, 9, 1, 40])
    assert offset(cache) == SEQ
    assert rel_error(got, case.expected) <= F32_TOL


@pytest.mark.parametrize("shape", sorted(EDGE_SHAPES))
def test_edge_shapes_match_transformers(shape: str, tmp_path: Path) -> None:
    """Top-1 and all-experts routing, a single expert, layer or kv head: a forward of SEQ
    (>= 64) tokens takes the sorted-experts path, then cached prefill and decode."""
    case = Case(tmp_path, shape)
    assert SEQ * case.cfg["num_experts_per_tok"] >= SORT_MIN_PAIRS
    model, _ = gptoss_mlx.load(case.dirs["hf"], dtype="float32", experts="mlx")
    assert rel_error(run(model, case.tokens), case.expected) <= F32_TOL
    got = prefill_then_decode(model, case.tokens, model.make_cache(slack=3), chunks=[70, 5])
    assert rel_error(got, case.expected) <= F32_TOL


def test_last_only_is_the_last_position(case: Case) -> None:
    model, _ = gptoss_mlx.load(case.dirs["hf"], dtype="float32", experts="mlx")
    got = run(model, case.tokens[:, :50], last_only=True)
    assert got.shape == (1, 1, case.cfg["vocab_size"])
    assert rel_error(got[0, 0], case.expected[0, 49]) <= F32_TOL


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_bfloat16_argmax_agrees_with_transformers(case: Case, layout: str) -> None:
    model, _ = gptoss_mlx.load(case.dirs[layout], dtype="bfloat16", experts="mlx")
    want = case.expected.argmax(-1)
    full = run(model, case.tokens).argmax(-1)
    assert (full == want).mean() >= 0.95
    cached = prefill_then_decode(model, case.tokens, model.make_cache(), chunks=[30]).argmax(-1)
    assert (cached == want).mean() >= 0.95


def test_batch_of_two_matches_transformers(case: Case) -> None:
    model, _ = gptoss_mlx.load(case.dirs["hf"], dtype="float32", experts="mlx")
    tokens = np.concatenate([case.tokens[:, :40], case.tokens[:, 100:140]], axis=0)
    assert rel_error(run(model, tokens), reference_logits(case.ref, tokens)) <= F32_TOL


def test_trim_after_window_wrapped_then_continue(case: Case) -> None:
    """Trim back past where the sliding caches dropped positions; the continuation on a new
    suffix matches transformers on the whole new sequence (and a fresh run)."""
    model, _ = gptoss_mlx.load(case.dirs["hf"], dtype="float32", experts="mlx")
    slack = 12
    cache = model.make_cache(slack=slack, compact_step=4)
    first = case.tokens[:, :120]
    prefill_then_decode(model, first, cache, chunks=[50])
    assert all(c.start > 0 for c in cache if hasattr(c, "start")), "the window never wrapped"
    assert trimmable(cache) >= slack + 1

    # Going back further than the sliding layers can is refused and changes nothing.
    assert not trim_to(cache, 120 - trimmable(cache) - 1)
    assert offset(cache) == 120

    keep = 120 - trimmable(cache)
    assert trim_to(cache, keep)
    assert offset(cache) == keep
    rng = np.random.default_rng(7)
    suffix = rng.integers(0, case.cfg["vocab_size"], size=(1, 30))
    new = np.concatenate([first[:, :keep], suffix], axis=1)
    got = prefill_then_decode(model, suffix, cache, chunks=[7])
    want = reference_logits(case.ref, new)[:, keep:]
    assert rel_error(got, want) <= F32_TOL
    fresh = run(model, new)[:, keep:]
    assert rel_error(got, fresh) <= 1e-5


def _community_folder(src: Path, dst: Path, mixed: bool) -> dict:
    """An mlx-community style folder: our converted one loaded by mlx-lm, the non-expert layers
    affine-quantized as `mlx_lm.convert -q` does (8 bits, group 64), saved. `mixed` quantizes
    v_proj and o_proj with 4 bits instead, as mlx-lm's mixed-precision recipes do."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(src)

    def predicate(path: str, module) -> bool | dict:
        if mixed and path.endswith(("v_proj", "o_proj")):
            return {"group_size": 32, "bits": 4, "mode": "affine"}
        return model.quant_predicate(path, module)

    model, config = quantize_model(model, config, group_size=64, bits=8, mode="affine",
                                   quant_predicate=predicate)
    save_model(dst, model)
    save_config(config, dst / "config.json")
    return config


@pytest.mark.parametrize("mixed", [False, True], ids=["q8", "mixed-bits"])
def test_loads_mlx_community_folder(case: Case, tmp_path: Path, mixed: bool) -> None:
    """The quantized folder computes gpt-oss with its (dequantized) weights: transformers
    given the same dequantized matrices is the oracle."""
    folder = tmp_path / "community"
    config = _community_folder(case.dirs["hf"], folder, mixed)
    assert config["quantization"]["model.layers.0.self_attn.q_proj"]["mode"] == "affine"
    model, tokenizer = gptoss_mlx.load(folder, dtype="float32", experts="mlx")
    assert tokenizer is None
    assert type(model.lm_head).__name__ == "QuantizedLinear"
    assert type(model.model.embed_tokens).__name__ == "QuantizedEmbedding"
    attn = model.model.layers[0].self_attn
    # q/k/v quantized alike become one matmul; quantized differently they stay apart.
    assert ("qkv_proj" in attn) != mixed
    assert type(attn["q_proj" if mixed else "qkv_proj"]).__name__ == "QuantizedLinear"

    saved = {}
    for f in sorted(folder.glob("model*.safetensors")):
        saved.update(mx.load(str(f)))
    ref = transformers.GptOssForCausalLM.from_pretrained(
        case.src, dtype=torch.float32,
        quantization_config=transformers.Mxfp4Config(dequantize=True))
    ref.eval()
    state = ref.state_dict()
    replaced = 0
    for name in [n[: -len(".scales")] for n in saved if n.endswith(".scales")]:
        if ".experts." in name:
            continue
        layer = config["quantization"][name]
        w = mx.dequantize(saved[f"{name}.weight"], saved[f"{name}.scales"].astype(mx.float32),
                          saved[f"{name}.biases"].astype(mx.float32),
                          group_size=layer["group_size"], bits=layer["bits"], mode="affine")
        state[f"{name}.weight"].copy_(torch.from_numpy(np.array(w.astype(mx.float32))))
        replaced += 1
    assert replaced >= 2 + 4 * case.cfg["num_hidden_layers"]  # embed, lm_head; q, k, v, router
    tokens = case.tokens[:, :60]
    assert rel_error(run(model, tokens), reference_logits(ref, tokens)) <= F32_TOL
    cache = model.make_cache()
    got = prefill_then_decode(model, tokens, cache, chunks=[20])
    assert rel_error(got, reference_logits(ref, tokens)) <= F32_TOL
