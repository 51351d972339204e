#!/usr/bin/env bash
# Set up a virtual environment, make a tiny random gpt-oss release (weights in the released
# layouts, the release's tokenizer files), convert it losslessly to an MLX folder (the vocabulary
# comes from its tokenizer.json), and generate from it. Random weights give random text.
# With real weights at hand, skip the first two steps: `gptoss-mlx convert openai/gpt-oss-20b DST`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
[ -x .venv/bin/gptoss-mlx ] || { python3 -m venv .venv && .venv/bin/pip install -q -e .; }

# The o200k_base vocabulary the tokenizer files are built from: $VOCAB, else the project's
# shared/ folder beside the checkout.
vocab=${VOCAB:-../shared/tokenizer/o200k_base.tiktoken}
[ -f "$vocab" ] || { echo "quickstart: set VOCAB to a copy of o200k_base.tiktoken" >&2; exit 1; }

.venv/bin/gptoss-mlx synthesize "$out/tiny-checkpoint" --preset tiny --layout both \
    --vocab "$vocab" --force
.venv/bin/gptoss-mlx convert "$out/tiny-checkpoint" "$out/tiny-mlx" --force
.venv/bin/gptoss-mlx generate -m "$out/tiny-mlx" -p "Write a haiku about unified memory." \
    --max-tokens 48 --temperature 0.8 --seed 0
