"""Train the demo model (torch on CPU) and save it as the compact file `demo.py` expands.

gpt-oss's math in plain torch (`DemoGptOss`; tests check it against transformers'
`GptOssForCausalLM`) is trained over the corpus' token ids only: its vocabulary is the used
ids plus one `rest` class standing for every other id (whose logit is the shared unused row's
plus log(number of unused ids), so the loss sees the probability all of them together take).
Hidden dimension 0 is reserved: embeddings hold a constant there and no layer writes to it, so
after the final norm it stays positive, and every unused lm_head row is -REST_WEIGHT on it
alone, far below the used tokens' logits.
The experts are then quantized to MXFP4 and the dense weights fine-tuned around them. Last, the
used lm_head rows are scaled by SHARPEN: the corpus' answers follow from the prompt, and the
short training leaves them too spread for sampling at temperature 1 (greedy is unchanged).

    pip install 'gptoss-mlx[train]'     # torch: not a runtime dependency
    python -m gptoss_mlx.convert.demo_train [--steps N] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gptoss_mlx.chat.tokenizer import VOCAB_FILENAME, VOCAB_SIZE, Tokenizer

from .demo import (
    DEMO_SHAPE,
    DEMO_WEIGHTS,
    RESERVED_VALUE,
    REST_WEIGHT,
    mxfp4_dequantize,
    mxfp4_quantize,
    save_demo,
)
from .demo_corpus import CorpusRenderer, sample
from .synthetic import tiny_config

SEED = 0
STEPS = 1800
SHARPEN = 8.0  # used lm_head rows are scaled by this at the end: sampling at T=1 is T=1/8's


def render_pool(tokenizer: Tokenizer, n: int, seed: int,
                cache: Path | None = None) -> list[tuple[list[int], list[int]]]:
    """`n` rendered training conversations (token ids, assistant mask), kept in `cache`
    (a folder) under a name holding `n`, `seed` and the corpus module's hash."""
    import hashlib
    import pickle

    from . import demo_corpus

    key = hashlib.sha256(Path(demo_corpus.__file__).read_bytes()).hexdigest()[:12]
    file = cache / f"demo-corpus-{n}-{seed}-{key}.pkl" if cache else None
    if file is not None and file.is_file():
        return pickle.loads(file.read_bytes())
    rng, cr = random.Random(seed), CorpusRenderer(tokenizer)
    pool = [cr.render(sample(rng)) for _ in range(n)]
    if file is not None:
        file.write_bytes(pickle.dumps(pool))
    return pool


class DemoGptOss(torch.nn.Module):
    """gpt-oss's forward pass in plain torch (the released math: RMSNorm, YaRN RoPE, attention
    with sinks and alternating sliding windows, top-k softmax routing, clamped SwiGLU experts),
    with transformers' parameter names so that `save_demo` writes the released names."""

    def __init__(self, cfg: dict, n_classes: int):
        super().__init__()
        from transformers import GptOssConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        c = GptOssConfig(**{k: v for k, v in cfg.items() if k != "quantization_config"})
        self.c = c
        inv_freq, self.rope_scale = ROPE_INIT_FUNCTIONS["yarn"](c, "cpu")
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        H, D, E, inter = c.hidden_size, c.head_dim, c.num_local_experts, c.intermediate_size
        nq, nkv = c.num_attention_heads, c.num_key_value_heads
        P = torch.nn.Parameter
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(n_classes, H)
        self.model.layers = torch.nn.ModuleList()
        for _ in range(c.num_hidden_layers):
            layer = torch.nn.Module()
            layer.input_layernorm = _Norm(H)
            layer.post_attention_layernorm = _Norm(H)
            layer.self_attn = torch.nn.Module()
            layer.self_attn.q_proj = torch.nn.Linear(H, nq * D)
            layer.self_attn.k_proj = torch.nn.Linear(H, nkv * D)
            layer.self_attn.v_proj = torch.nn.Linear(H, nkv * D)
            layer.self_attn.o_proj = torch.nn.Linear(nq * D, H)
            layer.self_attn.sinks = P(torch.zeros(nq))
            layer.mlp = torch.nn.Module()
            layer.mlp.router = torch.nn.Linear(H, E)
            layer.mlp.experts = torch.nn.Module()
            layer.mlp.experts.gate_up_proj = P(torch.randn(E, H, 2 * inter) / math.sqrt(H))
            layer.mlp.experts.gate_up_proj_bias = P(torch.zeros(E, 2 * inter))
            layer.mlp.experts.down_proj = P(torch.randn(E, inter, H) / math.sqrt(inter))
            layer.mlp.experts.down_proj_bias = P(torch.zeros(E, H))
            self.model.layers.append(layer)
        self.model.norm = _Norm(H)
        self.lm_head = torch.nn.Linear(H, n_classes, bias=False)
        with torch.no_grad():
            self.model.embed_tokens.weight.normal_(0.0, 1.0)
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The final-norm hidden states of `ids` [B, T]."""
        c = self.c
        B, T = ids.shape
        D, nq, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        ang = torch.arange(T, dtype=torch.float32)[:, None] * self.inv_freq[None]
        cos, sin = ang.cos() * self.rope_scale, ang.sin() * self.rope_scale
        pos = torch.arange(T)
        causal = pos[None, :] <= pos[:, None]
        window = causal & (pos[:, None] - pos[None, :] < c.sliding_window)
        x = self.model.embed_tokens(ids)
        for i, layer in enumerate(self.model.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = _rope(a.q_proj(h).view(B, T, nq, D).transpose(1, 2), cos, sin)
            k = _rope(a.k_proj(h).view(B, T, nkv, D).transpose(1, 2), cos, sin)
            v = a.v_proj(h).view(B, T, nkv, D).transpose(1, 2)
            k = k.repeat_interleave(nq // nkv, dim=1)
            v = v.repeat_interleave(nq // nkv, dim=1)
            allowed = window if c.layer_types[i] == "sliding_attention" else causal
            o = _attend(q, k, v, allowed, a.sinks)
            x = x + a.o_proj(o.transpose(1, 2).reshape(B, T, nq * D))
            x = x + _moe(layer.mlp, layer.post_attention_layernorm(x), c)
        return self.model.norm(x)


class _Norm(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
            sinks: torch.Tensor) -> torch.Tensor:
    """Softmax attention whose denominator also holds exp(sink) per head: an extra key and
    zero value whose score is the sink logit (scale 1/sqrt(head_dim), as released)."""
    B, h, T, D = q.shape
    bias = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))
    bias = torch.cat([bias.expand(1, h, T, T), sinks.view(1, h, 1, 1).expand(1, h, T, 1)], -1)
    zero = q.new_zeros(B, h, 1, D)
    return F.scaled_dot_product_attention(q, torch.cat([k, zero], 2), torch.cat([v, zero], 2),
                                          attn_mask=bias)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _moe(mlp: torch.nn.Module, h: torch.Tensor, c) -> torch.Tensor:
    """Top-k softmax routing; each expert runs on the tokens routed to it."""
    shape = h.shape
    h = h.reshape(-1, shape[-1])
    top, idx = mlp.router(h).topk(c.num_experts_per_tok, dim=-1)
    weights = torch.softmax(top, dim=-1)
    ex, limit = mlp.experts, c.swiglu_limit
    out = torch.zeros_like(h)
    for e in range(c.num_local_experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        gu = h[tok] @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        gate, up = gu[:, ::2].clamp(max=limit), gu[:, 1::2].clamp(-limit, limit)
        act = gate * torch.sigmoid(gate * 1.702) * (up + 1)
        y = act @ ex.down_proj[e] + ex.down_proj_bias[e]
        out = out.index_add(0, tok, y * weights[tok, slot, None])
    return out.reshape(shape)


def build_model(n_classes: int) -> DemoGptOss:
    """The demo-shaped model over `n_classes` token classes."""
    return DemoGptOss(tiny_config(**DEMO_SHAPE), n_classes)


def enforce_reserved(model) -> None:
    """Dimension 0: constant in the embeddings, written by no layer, unit final-norm weight;
    the rest class's lm_head row is -REST_WEIGHT there and zero elsewhere."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = RESERVED_VALUE
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.self_attn.o_proj.bias[0] = 0
            layer.mlp.experts.down_proj[:, :, 0] = 0
            layer.mlp.experts.down_proj_bias[:, 0] = 0
        model.model.norm.weight[0] = 1.0
        rest = model.lm_head.weight[-1]
        rest.zero_()
        rest[0] = -REST_WEIGHT


def loss_on(model, batch: torch.Tensor, mask: torch.Tensor, log_unused: float) -> torch.Tensor:
    """Mean cross-entropy of the masked (assistant) tokens, with the rest class's log-count."""
    hidden = model.hidden(batch[:, :-1])
    keep = mask[:, 1:].bool()
    h = hidden[keep]
    logits = h @ model.lm_head.weight.T
    logits[:, -1] += log_unused
    return F.cross_entropy(logits, batch[:, 1:][keep])


def quantize_experts(model) -> None:
    """Round every expert weight to MXFP4 (in place) and freeze the experts."""
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            for p in (ex.gate_up_proj, ex.down_proj):
                w = p.detach().transpose(1, 2).numpy()  # [E, out, in], as released
                blocks, scales = mxfp4_quantize(w)
                p.copy_(torch.from_numpy(mxfp4_dequantize(blocks, scales)).transpose(1, 2))
            for p in ex.parameters():
                p.requires_grad_(False)


def train(steps: int, out: Path, quant_steps: int | None = None, batch_size: int = 16,
          lr: float = 3e-3, pool: int = 20000, cache: Path | None = None,
          snapshot_every: int = 0, vocab: Path | None = None, log=sys.stderr) -> Path:
    """Train `steps` steps (the last `quant_steps`, default a sixth, with the experts rounded to
    MXFP4 and frozen), seeded, and save the compact file `out`; with `snapshot_every`, also
    save the model so far (experts rounded) as `out` with `.stepN` before its suffix."""
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # small tensors: one thread is faster, and never oversubscribed
    quant_steps = steps // 6 if quant_steps is None else quant_steps
    data = render_pool(_tokenizer(vocab), pool, SEED, cache)
    data.sort(key=lambda d: len(d[0]))  # batches of neighbours: little padding
    used = sorted({t for ids, _ in data for t in ids})
    index = np.full(VOCAB_SIZE, len(used), dtype=np.int64)
    index[used] = np.arange(len(used))
    log_unused = math.log(VOCAB_SIZE - len(used))
    print(f"{len(data)} conversations, {len(used)} used token ids", file=log, flush=True)
    model = build_model(len(used) + 1)
    enforce_reserved(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    rng = np.random.default_rng(SEED)
    started, ema, peak = time.monotonic(), None, lr
    for step in range(steps):
        if step == steps - quant_steps:
            quantize_experts(model)
            peak = lr / 3
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                    lr=peak, weight_decay=0.0, betas=(0.9, 0.98))
            print(f"step {step}: experts rounded to MXFP4 and frozen", file=log, flush=True)
        for g in opt.param_groups:  # cosine from `peak` down to a tenth of it
            g["lr"] = peak * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        x, m = _batch(data, index, rng, batch_size)
        loss = loss_on(model, x, m, log_unused)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        enforce_reserved(model)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % 20 == 0:
            print(f"step {step + 1} {time.monotonic() - started:.0f}s loss {ema:.4f}",
                  file=log, flush=True)
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            snap = copy.deepcopy(model)
            quantize_experts(snap)
            save_demo(out.with_suffix(f".step{step + 1}{out.suffix}"), snap,
                      np.array(used, dtype=np.int32))
    if quant_steps == 0:
        quantize_experts(model)
    with torch.no_grad():  # the corpus' answers follow from the prompt: sharpen (exact in bf16)
        model.lm_head.weight[:-1] *= SHARPEN
    save_demo(out, model, np.array(used, dtype=np.int32))
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB)", file=log)
    return out


def _batch(data: list[tuple[list[int], list[int]]], index: np.ndarray,
           rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` neighbouring conversations of the length-sorted pool, as class ids and masks."""
    first = int(rng.integers(0, len(data) - size + 1))
    rows = data[first:first + size]
    width = max(len(ids) for ids, _ in rows)
    x = np.zeros((size, width), dtype=np.int64)
    m = np.zeros((size, width), dtype=np.int64)
    for row, (ids, mask) in enumerate(rows):
        x[row, : len(ids)] = index[ids]
        m[row, : len(ids)] = mask
    return torch.from_numpy(x), torch.from_numpy(m)


def _tokenizer(vocab: Path | None) -> Tokenizer:
    """o200k_harmony from `vocab`, else from a `shared/tokenizer/` folder above this file."""
    here = Path(__file__).resolve()
    found = (p / "shared" / "tokenizer" / VOCAB_FILENAME for p in here.parents)
    path = Path(vocab) if vocab else next((f for f in found if f.is_file()), None)
    if path is None:
        raise SystemExit(f"demo_train: no {VOCAB_FILENAME} found (shared/tokenizer/); "
                         "pass --vocab PATH")
    return Tokenizer(path)  # checks its sha256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--out", type=Path, default=DEMO_WEIGHTS)
    ap.add_argument("--cache", type=Path, help="a folder keeping the rendered corpus")
    ap.add_argument("--snapshot-every", type=int, default=0, help="save the model every N steps")
    ap.add_argument("--vocab", type=Path, help="o200k_base.tiktoken (default: shared/tokenizer/)")
    args = ap.parse_args()
    train(args.steps, args.out, cache=args.cache, snapshot_every=args.snapshot_every,
          vocab=args.vocab)


if __name__ == "__main__":
    main()
