"""`gptoss-mlx generate --prompts FILE.jsonl` on the demo model: each result equals a solo
`generate` run of the same prompt (greedy) and the server's answer to the same request body
(tools included); message and usage parse as the openai SDK's types; bad lines are refused in one
line before anything is generated; --output is all or nothing; stats go to stderr only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from click.testing import CliRunner
from openai.types.chat import ChatCompletionMessage
from openai.types.completion_usage import CompletionUsage

from gptoss_mlx.cli import main

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
PROMPTS = ["Spell rocket backwards.", "Uppercase the word garden.", "Reverse the word lamp."]


def user(text: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **fields}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_results_equal_solo_generate_runs(demo_model_dir: Path, tmp_path: Path) -> None:
    """Greedy by the line (temperature 0) or by the command's default (--temperature 0); the
    blank line is skipped and the line numbers are the file's."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        user(PROMPTS[0], temperature=0, max_tokens=40),
        user(PROMPTS[1], max_completion_tokens=40),
        "",
        user(PROMPTS[2]),
    ])
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_mlx", "generate", "-m", str(demo_model_dir),
         "--prompts", str(prompts), "--temperature", "0", "--max-tokens", "40"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout: JSON lines only
    assert [r["line"] for r in results] == [1, 2, 4]
    for line in (1, 2, 4):
        assert f"line {line}: prompt: " in proc.stderr
    assert "3 requests: " in proc.stderr and "generated tokens" in proc.stderr
    for prompt, got in zip(PROMPTS, results, strict=True):
        solo = run("generate", "-m", str(demo_model_dir), "-p", prompt, "--temperature", "0",
                   "--max-tokens", "40", "--json")
        assert solo.exit_code == 0, solo.output
        want = json.loads(solo.stdout)
        message = ChatCompletionMessage.model_validate(got["message"])
        usage = CompletionUsage.model_validate(got["usage"])
        assert message.content == want["channels"].get("final", "")
        assert got["message"]["reasoning"] == want["channels"].get("analysis")
        assert not message.tool_calls and not want["tool_calls"]
        assert usage.prompt_tokens == want["stats"]["prompt_tokens"]
        assert usage.completion_tokens == want["stats"]["generated_tokens"]
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert got["finish_reason"] == want["finish_reason"]
    assert results[0]["message"]["content"] == "tekcor"  # the demo model knows this one


def test_results_equal_the_servers_answers(demo_model_dir: Path, tmp_path: Path) -> None:
    """The same request bodies through the server's chat completions: same message (tool calls
    and stop strings included), finish reason and usage."""
    from serving import running

    import gptoss_mlx
    from gptoss_mlx.server.app import create_app
    from gptoss_mlx.server.engine import Engine

    bodies = [
        user("What is the weather in Paris?", tools=[WEATHER_TOOL], temperature=0,
             max_tokens=80),
        user("Spell rocket backwards.", temperature=0, stop=["kc"], max_tokens=40),
        user("What is the weather in Oslo?", tools=[WEATHER_TOOL], temperature=0,
             tool_choice="none", max_tokens=8),
    ]
    out = tmp_path / "out.jsonl"
    r = run("generate", "-m", str(demo_model_dir), "--prompts",
            str(write_jsonl(tmp_path / "p.jsonl", bodies)), "--output", str(out))
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert results[0]["finish_reason"] == "tool_calls"
    call = results[0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and "city" in json.loads(call["arguments"])
    assert results[1]["message"]["content"] == "te" and results[1]["finish_reason"] == "stop"
    assert results[2]["finish_reason"] == "length"

    model, tokenizer = gptoss_mlx.load(demo_model_dir)
    with running(create_app(Engine(model, tokenizer), "demo")) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0, timeout=120)
        for body, got in zip(bodies, results, strict=True):
            want = client.chat.completions.create(model="demo", **body)
            choice = want.choices[0]
            assert got["finish_reason"] == choice.finish_reason
            assert got["message"]["content"] == choice.message.content
            assert got["message"]["reasoning"] == choice.message.model_extra["reasoning"]
            assert [(c["function"]["name"], c["function"]["arguments"])
                    for c in got["message"].get("tool_calls", [])] == [
                (c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
            assert got["usage"]["prompt_tokens"] == want.usage.prompt_tokens
            assert got["usage"]["completion_tokens"] == want.usage.completion_tokens


@pytest.mark.parametrize(("lines", "expected"), [
    ([user("Hi"), "{not json", user("Hi")], "line 2: not JSON (Expecting property name"),
    ([user("Hi"), [1, 2]], "line 2: expected a JSON object"),
    ([user("Hi"), user("Hi", temperature=5)],
     "line 2: Invalid value for 'temperature': Input should be less than or equal to 2"),
    ([{"messages": [{"role": "robot", "content": "Hi"}]}],
     "line 1: Invalid value for 'messages[0].role'"),
    ([{"max_tokens": 3}], "line 1: Missing required parameter: 'messages'."),
    ([user("Hi", stop=["a", "b", "c", "d", "e"])], "line 1: Invalid value for 'stop'"),
    (["", " "], "no requests"),
])
def test_a_bad_line_is_refused_before_loading(tmp_path: Path, lines: list[Any],
                                              expected: str) -> None:
    """Checked before the model loads: the model folder does not even exist."""
    prompts = write_jsonl(tmp_path / "p.jsonl", lines)
    out = tmp_path / "out.jsonl"
    r = run("generate", "-m", str(tmp_path / "no-model"), "--prompts", str(prompts),
            "--output", str(out))
    assert r.exit_code == 1
    assert r.stdout == ""
    assert r.stderr.startswith(f"Error: {prompts}: {expected}"), r.stderr
    assert r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == [prompts]  # no output, no temporary file


def test_a_line_that_is_not_utf8(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(json.dumps(user("Hi")).encode() + b"\n" + b'{"messages": "\xff"}\n')
    r = run("generate", "-m", str(tmp_path / "no-model"), "--prompts", str(prompts))
    assert r.exit_code == 1
    assert r.stderr == (f"Error: {prompts}: line 2 is not valid UTF-8 (byte 0xff at byte 15); "
                        "expected UTF-8 JSON\n")


@pytest.mark.parametrize(("line", "expected"), [
    (user("Hi", tools=[WEATHER_TOOL], tool_choice={"type": "function",
                                                   "function": {"name": "nope"}}),
     "line 3: tool_choice: tool_choice names 'nope', which is not among the tools"),
    (user("Hi", tool_choice="required"),
     "line 3: tool_choice: tool_choice asks for a function call but no function tools"),
    (user("word " * 3000), "line 3: messages: This model's maximum context length is 2048"),
])
def test_a_request_the_server_would_refuse_stops_the_batch_before_generating(
        demo_model_dir: Path, tmp_path: Path, line: dict, expected: str) -> None:
    """Rendered after the model loads, but every line before the first token: nothing is
    written and an existing --output stays as it was."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [user("Hi"), user("Hello"), line])
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    r = run("generate", "-m", str(demo_model_dir), "--prompts", str(prompts), "--output",
            str(out), "--max-context", "2048")
    assert r.exit_code == 1
    assert r.stderr.startswith(f"Error: {prompts}: {expected}"), r.stderr
    assert "prompt:" not in r.stderr  # no generation ran
    assert out.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "p.jsonl"]


def test_output_is_all_or_nothing(demo_model_dir: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the first result: exit 130, the old file intact, no temporary left."""
    import gptoss_mlx.batch

    real = gptoss_mlx.batch.run_requests

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        for n, item in enumerate(real(*args, **kwargs)):
            if n == 1:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(gptoss_mlx.batch, "run_requests", interrupted)
    prompts = write_jsonl(tmp_path / "p.jsonl", [user("Hi", max_tokens=2)] * 3)
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    args = ["generate", "-m", str(demo_model_dir), "--prompts", str(prompts), "--output",
            str(out)]
    r = run(*args)
    assert r.exit_code == 130
    assert out.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "p.jsonl"]
    monkeypatch.setattr(gptoss_mlx.batch, "run_requests", real)
    assert run(*args).exit_code == 0
    assert [json.loads(x)["line"] for x in out.read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "p.jsonl"]


@pytest.mark.parametrize("extra", [["-p", "Hi"], ["--json"], ["--raw"], ["--system", "S"],
                                   ["--developer", "D"]])
def test_options_that_do_not_apply_to_a_batch(tmp_path: Path, extra: list[str]) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [user("Hi")])
    r = run("generate", "-m", "x", "--prompts", str(prompts), *extra)
    assert r.exit_code == 2 and "do not apply" in r.stderr


def test_output_needs_prompts_and_a_prompt_is_needed(tmp_path: Path) -> None:
    r = run("generate", "-m", "x", "-p", "Hi", "--output", str(tmp_path / "o"))
    assert r.exit_code == 2 and "--output goes with --prompts" in r.stderr
    r = run("generate", "-m", "x")
    assert r.exit_code == 2 and "Missing option '-p' / '--prompt'" in r.stderr


def test_an_output_folder_that_does_not_exist(tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [user("Hi")])
    out = tmp_path / "missing" / "out.jsonl"
    r = run("generate", "-m", str(tmp_path / "no-model"), "--prompts", str(prompts),
            "--output", str(out))
    assert r.exit_code == 1
    assert r.stderr == f"Error: cannot write --output {out}: No such file or directory\n"
