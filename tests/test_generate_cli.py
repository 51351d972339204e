"""`gptoss-mlx generate` run as a user would, on the tiny converted model with the real vocabulary
(random weights: random text, which is fine); bad input gives one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_mlx.chat.tokenizer import VOCAB_FILENAME

STATS = ("prompt:", "time to first token", "prefill:", "decode:", "peak memory")


def cli(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gptoss_mlx", *args], input=stdin, capture_output=True, text=True,
        timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )


def copy_model(src: Path, dst: Path, *, vocab: bool = True, config: dict | None = None) -> Path:
    """A model folder sharing `src`'s weights (symlinks), optionally without vocabulary (neither
    o200k_base.tiktoken nor the tokenizer.json it can be derived from) or with config.json fields
    replaced."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name in (VOCAB_FILENAME, "tokenizer.json") and not vocab:
            continue
        if f.name == "config.json" and config:
            (dst / f.name).write_text(json.dumps({**json.loads(f.read_text()), **config}))
        else:
            (dst / f.name).symlink_to(f)
    return dst


def test_generate_streams_answer_and_stats(tiny_model_dir: Path) -> None:
    r = cli("generate", "-m", str(tiny_model_dir), "-p", "Hello there", "--max-tokens", "12",
            "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    for part in STATS:
        assert part in r.stderr


def test_prompt_from_stdin_and_json(tiny_model_dir: Path) -> None:
    r = cli("generate", "-m", str(tiny_model_dir), "-p", "-", "--max-tokens", "6",
            "--temperature", "0", "--json", stdin="Summarise this\nplease.")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"channels", "messages", "tool_calls", "finish_reason", "stats"}
    assert out["stats"]["generated_tokens"] <= 6
    assert out["stats"]["prompt_tokens"] > 0
    assert "prompt:" in r.stderr


def test_raw_prints_harmony_text(tiny_model_dir: Path) -> None:
    args = ("generate", "-m", str(tiny_model_dir), "-p", "Hi", "--max-tokens", "8",
            "--temperature", "0")
    raw = cli(*args, "--raw")
    js = cli(*args, "--json")
    assert raw.returncode == 0 and js.returncode == 0, raw.stderr + js.stderr
    text = "".join(m["content"] for m in json.loads(js.stdout)["messages"])
    assert text.strip() in raw.stdout


def one_error_line(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_missing_model_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    one_error_line(cli("generate", "-m", str(missing), "-p", "x"), str(missing), "no such folder")


def test_model_path_is_a_file(tiny_model_dir: Path) -> None:
    config = tiny_model_dir / "config.json"
    r = cli("generate", "-m", str(config), "-p", "x")
    one_error_line(r, str(config), "not a folder")
    assert "no such folder" not in r.stderr


def test_folder_without_vocabulary(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_model_dir, tmp_path / "novocab", vocab=False)
    one_error_line(cli("generate", "-m", str(folder), "-p", "x"), str(folder), VOCAB_FILENAME)
    one_error_line(cli("chat", "-m", str(folder)), str(folder), VOCAB_FILENAME)


@pytest.mark.parametrize("field,value", [("vocab_size", 10**12),
                                         ("max_position_embeddings", 10**15)])
def test_config_out_of_bounds_is_one_line(tiny_model_dir: Path, tmp_path: Path, field: str,
                                          value: int) -> None:
    """vocab_size 10**12 overflowed inside MLX with a traceback; a 10**15 context was taken."""
    folder = copy_model(tiny_model_dir, tmp_path / "huge", config={field: value})
    r = cli("generate", "-m", str(folder), "-p", "x")
    one_error_line(r, f"{folder / 'config.json'}: {field}={value} must be in 1..")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_unknown_effort(tiny_model_dir: Path, command: str) -> None:
    extra = ["-p", "x"] if command == "generate" else []
    r = cli(command, "-m", str(tiny_model_dir), *extra, "--reasoning-effort", "extreme")
    one_error_line(r, "extreme", "low, medium, high")


@pytest.mark.parametrize(("given", "effort"), [("HIGH", "high"), ("minimal", "low")])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_effort_names_as_the_server_takes_them(tiny_model_dir: Path, command: str, given: str,
                                               effort: str) -> None:
    """Any case, and OpenAI's none/minimal (low), as the server's reasoning_effort."""
    from gptoss_mlx.cli import main

    extra = ["-p", "x"] if command == "generate" else []
    ctx = main.commands[command].make_context(
        command, ["-m", str(tiny_model_dir), *extra, "--reasoning-effort", given])
    assert ctx.params["reasoning_effort"] == effort


def test_closed_pipe_exits_as_sigpipe_would(tiny_model_dir: Path) -> None:
    """`generate ... | head -c 5`: status 141 (128 + SIGPIPE) for `set -o pipefail`, no noise."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptoss_mlx", "generate", "-m", str(tiny_model_dir), "-p", "Hi",
         "--max-tokens", "300", "--temperature", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(5)) == 5
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "Error" not in stderr


def test_prompt_longer_than_context(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_model(tiny_model_dir, tmp_path / "short", config={"max_position_embeddings": 64})
    r = cli("generate", "-m", str(folder), "-p", "word " * 100)
    one_error_line(r, "tokens but the model's context holds 64")
    r = cli("generate", "-m", str(tiny_model_dir), "-p", "word " * 100, "--max-context", "40")
    one_error_line(r, "tokens but the context is limited to 40")
    r = cli("chat", "-m", str(tiny_model_dir), "--max-context", "40", stdin="Hi\n")
    one_error_line(r, "the system and developer messages alone take", "of the 40-token context")
    r = cli("chat", "-m", str(tiny_model_dir), "--max-context", "120", stdin="word " * 100 + "\n")
    assert r.returncode == 0 and "tokens but the context is limited to 120" in r.stderr
    assert "/clear" not in r.stderr  # with no history, clearing would not help


def test_max_context_ends_the_answer(tiny_model_dir: Path) -> None:
    r = cli("generate", "-m", str(tiny_model_dir), "-p", "Hi", "--temperature", "0", "--json",
            "--max-context", "75")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"]
    assert stats["finish_reason"] == "context"  # greedy on fixed random weights: no stop token
    assert stats["prompt_tokens"] + stats["generated_tokens"] == 75


def test_model_larger_than_the_working_set(tiny_model_dir: Path) -> None:
    r = cli("generate", "-m", str(tiny_model_dir), "-p", "x", GPTOSS_MLX_WORKING_SET="1000000")
    one_error_line(r, "GPU working set")


@pytest.mark.parametrize("mode", ["hidden", "dim", "full"])
def test_channel_printer_routes_channels(vocab_path: Path, mode: str) -> None:
    """The answer goes to stdout; reasoning, preambles and tool calls to stderr unless hidden."""
    import io

    from gptoss_mlx.chat.parser import HarmonyStreamParser
    from gptoss_mlx.chat.tokenizer import Tokenizer
    from gptoss_mlx.cli.terminal import ChannelPrinter

    tok = Tokenizer(vocab_path)
    ids = tok.encode(
        "<|channel|>analysis<|message|>Think hard.<|end|><|start|>assistant<|channel|>commentary"
        "<|message|>Checking.<|end|><|start|>assistant<|channel|>commentary to=functions.f json"
        '<|message|>{"a": 1}<|call|><|start|>assistant<|channel|>final<|message|>The answer.'
        "<|return|>", allow_special=True)
    out, err = io.StringIO(), io.StringIO()
    printer = ChannelPrinter(mode, out=out, err=err)
    parser = HarmonyStreamParser(tok)
    for t in ids:
        for event in parser.feed(t):
            printer(event)
    printer.close()
    assert out.getvalue() == "The answer.\n"
    if mode == "hidden":
        assert err.getvalue() == ""
    else:  # StringIO is no terminal: never dimmed
        assert err.getvalue() == 'Think hard.\nChecking.\n[call functions.f] {"a": 1}\n'


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(
    ("option", "value"),
    [("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan"),
     ("--min-p", "nan"), ("--seed", "-1"), ("--seed", str(2**64))],
)
def test_out_of_range_sampling_option(tiny_model_dir: Path, command: str, option: str,
                                      value: str) -> None:
    """nan and inf pass a plain range check; MLX seeds are 0 .. 2**64-1."""
    extra = ["-p", "x"] if command == "generate" else []
    r = cli(command, "-m", str(tiny_model_dir), *extra, option, value, "--max-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"Invalid value for '{option}'" in r.stderr.strip().splitlines()[-1]


def test_seed_bounds_are_accepted(tiny_model_dir: Path) -> None:
    for seed in ("0", str(2**64 - 1)):
        r = cli("generate", "-m", str(tiny_model_dir), "-p", "x", "--seed", seed,
                "--max-tokens", "2")
        assert r.returncode == 0, r.stderr


def cli_bytes(*args: bytes | str, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptoss_mlx", *args], input=stdin,
                          capture_output=True, timeout=300, env={**os.environ, **env})


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])
def test_prompt_that_is_not_utf8(tiny_model_dir: Path, errors: str) -> None:
    """Latin-1 bytes from stdin, an argument or --developer: one line, no traceback."""
    model = str(tiny_model_dir)
    io = {"PYTHONIOENCODING": f"utf-8:{errors}"}
    for args, stdin in [
        (("-p", "-"), b"caf\xe9 au lait"),
        ((b"-p", b"caf\xe9"), b""),
        (("-p", "x", b"--developer", b"\xff"), b""),
    ]:
        r = cli_bytes("generate", "-m", model, "--max-tokens", "2", *args, stdin=stdin, **io)
        err = r.stderr.decode("utf-8", "replace")
        assert r.returncode == 1 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and "UTF-8" in err, err


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])
def test_chat_line_that_is_not_utf8(tiny_model_dir: Path, tmp_path: Path, errors: str) -> None:
    """A bad line is refused with one line and the session goes on to the next message."""
    r = cli_bytes("chat", "-m", str(tiny_model_dir), "--max-tokens", "2",
                  stdin=b"caf\xe9\nhello\n", GPTOSS_MLX_HISTORY=str(tmp_path / "history"),
                  PYTHONIOENCODING=f"utf-8:{errors}")
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0 and "Traceback" not in err, err
    assert sum("UTF-8" in line for line in err.splitlines()) == 1, err
    assert err.count("prompt: ") == 1, err  # "hello" was answered


def test_ctrl_c_exits_130_without_traceback(tiny_model_dir: Path) -> None:
    """As a shell reports a command killed by SIGINT: status 128 + 2, nothing but a newline."""
    import signal

    p = subprocess.Popen(
        [sys.executable, "-m", "gptoss_mlx", "generate", "-m", str(tiny_model_dir), "-p", "Hi",
         "--max-tokens", "100000", "--seed", "0", "--raw"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert p.stdout is not None
    p.stdout.read(1)  # generation has started
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.decode().strip() == ""


def test_piped_chat_keeps_prompts_off_stdout(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`printf 'q1\\nq2\\n' | chat > answers`: stdout holds the answers only, one per line."""
    r = cli("chat", "-m", str(tiny_model_dir), "--max-tokens", "3", "--temperature", "0",
            stdin="Hello\nfirst\\\nsecond\n", GPTOSS_MLX_HISTORY=str(tmp_path / "history"))
    assert r.returncode == 0, r.stderr
    assert not any(line.startswith((">>> ", "... ")) for line in r.stdout.splitlines()), r.stdout
    assert len(r.stdout.splitlines()) == 2, r.stdout
    assert r.stderr.count("prompt: ") == 2


def test_raw_and_json_are_exclusive(tiny_model_dir: Path) -> None:
    """Both would print on stdout, so `--json | jq` would get harmony text before the object."""
    r = cli("generate", "-m", str(tiny_model_dir), "-p", "x", "--raw", "--json",
            "--max-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert "--raw" in r.stderr.splitlines()[-1] and "--json" in r.stderr.splitlines()[-1]


@pytest.mark.parametrize(("args", "stdin"), [(("-p", ""), None), (("-p", "-"), ""),
                                             (("-p", "-"), " \n\n")])
def test_empty_prompt(tiny_model_dir: Path, args: tuple[str, ...], stdin: str | None) -> None:
    """`-p "$(cat missing)"` or an empty pipe must not silently answer an empty message."""
    r = cli("generate", "-m", str(tiny_model_dir), *args, "--max-tokens", "2", stdin=stdin)
    one_error_line(r, "prompt is empty")
    assert r.stdout == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_is_one_error_line(tiny_model_dir: Path) -> None:
    """`generate > file` on a full disk: the write error, not a traceback."""
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [sys.executable, "-m", "gptoss_mlx", "generate", "-m", str(tiny_model_dir), "-p", "Hi",
             "--max-tokens", "4", "--seed", "0"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=300,
        )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "No space left" in r.stderr, r.stderr


SCHEMA = {"type": "object", "properties": {
    "word": {"type": "string", "pattern": "^[a-z]{1,6}$"},
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
    "required": ["word", "n", "tags"], "additionalProperties": False}


def test_json_schema_answers_json_that_validates(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Random weights never write JSON by themselves: the schema makes the answer."""
    import jsonschema

    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps(SCHEMA))
    args = ("generate", "-m", str(tiny_model_dir), "-p", "Pick a word.", "--max-tokens", "64",
            "--json-schema", str(schema))
    for seed in ("0", "1"):
        r = cli(*args, "--seed", seed, "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        jsonschema.validate(out["answer"], SCHEMA)
        assert json.loads(out["channels"]["final"]) == out["answer"]
    plain = cli(*args, "--seed", "2")
    assert plain.returncode == 0, plain.stderr
    jsonschema.validate(json.loads(plain.stdout), SCHEMA)


def test_json_schema_answer_cut_off_is_an_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps(SCHEMA))
    r = cli("generate", "-m", str(tiny_model_dir), "-p", "Pick a word.", "--max-tokens", "8",
            "--json-schema", str(schema), "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["finish_reason"] == "length"
    assert "answer" not in json.loads(r.stdout)
    assert "cut off (length) before its JSON was complete" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("text,needle", [
    ("{not json", "not JSON"),
    ('{"type": "object", "not": {}}', "not"),
    ('{"type": "integer", "minimum": 3, "maximum": 1}', "minimum (3) is greater than maximum (1)"),
])
def test_json_schema_that_cannot_be_enforced_is_one_line(tmp_path: Path, text: str,
                                                         needle: str) -> None:
    """Refused before any model is loaded (the folder need not exist)."""
    schema = tmp_path / "bad.json"
    schema.write_text(text)
    r = cli("generate", "-m", str(tmp_path / "no-model"), "-p", "x", "--json-schema", str(schema))
    one_error_line(r, str(schema), needle)
