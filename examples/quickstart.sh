#!/usr/bin/env bash
# Set up a virtual environment, write the demo model (a small gpt-oss trained to speak harmony,
# shipped inside the package) in the released layout with the release's tokenizer files, convert
# it to an MLX folder (the vocabulary comes from its tokenizer.json), and ask it something: its
# reasoning shows on stderr, its answer on stdout. No download.
# With real weights at hand, skip the first two steps: `gptoss-mlx convert openai/gpt-oss-20b DST`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
[ -x .venv/bin/gptoss-mlx ] || { python3 -m venv .venv && .venv/bin/pip install -q -e .; }

# The o200k_base vocabulary the tokenizer files are built from: $VOCAB, else the project's
# shared/ folder beside the checkout.
vocab=${VOCAB:-../shared/tokenizer/o200k_base.tiktoken}
[ -f "$vocab" ] || { echo "quickstart: set VOCAB to a copy of o200k_base.tiktoken" >&2; exit 1; }

.venv/bin/gptoss-mlx synthesize "$out/demo-checkpoint" --preset demo --layout both \
    --vocab "$vocab" --force
.venv/bin/gptoss-mlx convert "$out/demo-checkpoint" "$out/demo-mlx" --force
.venv/bin/gptoss-mlx generate -m "$out/demo-mlx" -p "Spell rocket backwards." \
    --show-reasoning full --max-tokens 64 --temperature 0
