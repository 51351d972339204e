"""`gptoss-mlx chat` driven through a pseudo-terminal, as a user would drive it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pexpect

PROMPT = ">>> "
STATS = re.compile(r"prompt: (\d+) tokens(?: \((\d+) cached\))?, time to first token: .*"
                   r"decode: \d+ tokens(?: at [\d.]+ tok/s)?, peak memory: ")


def spawn(model: Path, tmp_path: Path, *args: str) -> pexpect.spawn:
    env = {"GPTOSS_MLX_HISTORY": str(tmp_path / "history"), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "gptoss_mlx", "chat", "-m", str(model), *args],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect_exact(PROMPT)
    return child


def turn(child: pexpect.spawn, text: str) -> tuple[int, int]:
    """Send a message, wait for its stats line and the next prompt; (prompt, cached) tokens."""
    child.sendline(text)
    child.expect(STATS)
    prompt, cached = int(child.match.group(1)), int(child.match.group(2) or 0)
    child.expect_exact(PROMPT)
    return prompt, cached


def test_chat_session(tiny_model_dir: Path, tmp_path: Path) -> None:
    child = spawn(tiny_model_dir, tmp_path, "--max-tokens", "5", "--seed", "0")
    first_prompt, first_cached = turn(child, "Hello")
    assert first_cached == 0
    # Turn 2 reuses the cache: at least the whole first prompt but its `<|start|>assistant`.
    second_prompt, second_cached = turn(child, "And again")
    assert second_cached >= first_prompt - 2 and second_prompt > first_prompt

    child.sendline("/effort high")
    child.expect_exact("reasoning effort: high")
    child.expect_exact(PROMPT)
    # A multi-line message: a trailing backslash continues it.
    child.sendline("first line\\")
    child.expect_exact("... ")
    _, cached = turn(child, "second line")
    assert cached > 0  # the system message changed in its effort line only

    child.sendline("/clear")
    child.expect_exact("conversation cleared")
    child.expect_exact(PROMPT)
    child.sendline("/nonsense")
    child.expect_exact("unknown command /nonsense")
    child.expect_exact(PROMPT)
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Hello" in (tmp_path / "history").read_text()


def test_ctrl_c_stops_the_answer_and_keeps_the_session(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    child = spawn(tiny_model_dir, tmp_path, "--seed", "1", "--max-tokens", "150")
    child.sendline("Tell me a very long story")
    child.expect_exact("Tell me a very long story")  # the terminal's echo
    child.expect(r"\S{3}")  # then some of the answer streams: prefill is done
    child.sendintr()  # Ctrl-C
    child.expect_exact("[stopped; this turn was dropped]")
    child.expect_exact(PROMPT)
    child.sendline('"""')
    child.sendline("a message")
    child.sendline("over two lines")
    child.sendline('"""')
    child.expect(STATS)
    assert int(child.match.group(2) or 0) > 0  # the cache survived the interruption
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_prompt_cache_dir_survives_a_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A second `chat` reads the long developer message's KV cache back from the folder; a
    truncated file is reported, ignored and written again."""
    developer = "Follow the rules. " * 300  # more than the 1024 tokens worth storing
    store = tmp_path / "prompts"
    args = ("--max-tokens", "2", "--seed", "0", "--developer", developer,
            "--prompt-cache-dir", str(store))

    def first_turn() -> tuple[int, int, str]:
        child = spawn(tiny_model_dir, tmp_path, *args)
        child.sendline("Hello")
        child.expect(STATS)
        before = child.before
        prompt, cached = int(child.match.group(1)), int(child.match.group(2) or 0)
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        return prompt, cached, before

    prompt, cached, _ = first_turn()
    assert cached == 0
    [path] = store.glob("*.safetensors")
    again, cached, _ = first_turn()
    assert again == prompt and 1024 < cached < prompt
    path.write_bytes(path.read_bytes()[:4096])
    _, cached, output = first_turn()
    assert cached == 0 and f"prompt cache {path} ignored and removed" in output
    assert path.is_file()  # stored again
