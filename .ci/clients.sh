#!/usr/bin/env bash
# The coding clients tests/test_clients.py drives, at pinned versions, from the package registries
# into $GPTOSS_CLIENTS (default .ci/clients/, gitignored): Codex CLI from npm, aider from PyPI in
# its own venv (it pins many packages). A client already there at its version is kept. A registry
# that refuses is reported here and recorded in $GPTOSS_CLIENTS/refused, so the tests skip with
# that reason; any other failure stops the script.
#   bash .ci/clients.sh            # locally, the same as CI
set -euo pipefail
cd "$(dirname "$0")/.."
CODEX_VERSION=0.169.1
AIDER_VERSION=0.86.2
dir=${GPTOSS_CLIENTS:-.ci/clients}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
: >"$dir/refused"
start=$(date +%s)

refused() {  # name, log file
    echo "CI: the registry refused $1; its tests will skip (see $2):" >&2
    tail -5 "$2" >&2
    echo "$1: the registry refused the install (.ci/clients.sh)" >>"$dir/refused"
}

codex="$dir/codex/bin/codex"
if [ "$("$codex" --version 2>/dev/null)" != "codex-cli $CODEX_VERSION" ]; then
    rm -rf "$dir/codex"
    if ! npm install -g --prefix "$dir/codex" --no-fund --no-audit \
            "@openai/codex@$CODEX_VERSION" >"$dir/codex.log" 2>&1; then
        grep -qE "E403|E404|ETIMEDOUT|ECONNREFUSED|ENOTFOUND|EAI_AGAIN" "$dir/codex.log" \
            || { cat "$dir/codex.log" >&2; exit 1; }
        refused codex "$dir/codex.log"
    fi
fi

aider="$dir/aider/bin/aider"
if ! "$dir/aider/bin/python" -c "import importlib.metadata as m, sys;
sys.exit(m.version('aider-chat') != '$AIDER_VERSION')" 2>/dev/null; then
    rm -rf "$dir/aider"
    python3 -m venv "$dir/aider"
    if ! "$dir/aider/bin/pip" install -q "aider-chat==$AIDER_VERSION" >"$dir/aider.log" 2>&1; then
        grep -qE "403|404|No matching distribution|Could not find a version" "$dir/aider.log" \
            || { cat "$dir/aider.log" >&2; exit 1; }
        rm -rf "$dir/aider"
        refused aider "$dir/aider.log"
    fi
fi
[ -x "$codex" ] && echo "clients: $("$codex" --version)"
[ -x "$aider" ] && echo "clients: aider $("$dir/aider/bin/python" -c \
    "import importlib.metadata as m; print(m.version('aider-chat'))")"
echo "clients: installed in $(( $(date +%s) - start )) s into $dir"
