"""Real clients against `serve`'s app over loopback: the official client's stream helpers,
openai-agents, Codex CLI and aider. The model is the scripted double (tests/scripted_model.py),
so every tool round trip is exact; each exchange the clients saw is validated against the
`openai` SDK's types afterwards (`LoopbackServer.check`).

Codex CLI and aider are installed by `.ci/clients.sh` into `$GPTOSS_CLIENTS` (default
`.ci/clients/`); see `clients.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clients import installed
from loopback import Exchange, LoopbackServer, served, sse
from scripted_model import ScriptedModel, Turn, call, final

WEATHER_FN = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False},
}
ANSWER = "It is sunny in Paris, 21 degrees."
WEATHER_TURNS = [
    Turn("functions.get_weather to=assistant", final(ANSWER, reasoning="The tool answered.")),
    Turn("weather", call("get_weather", {"city": "Paris"}, reasoning="I should call the tool.")),
]
QUESTION = "What is the weather in Paris?"
TOOL_RESULT = '{"temp_c": 21, "sky": "sunny"}'


@pytest.fixture
def weather(scripted_server: LoopbackServer) -> LoopbackServer:
    scripted_server.model.script(WEATHER_TURNS)
    scripted_server.exchanges.clear()
    return scripted_server


# -- the official client's stream helpers ----------------------------------------------------

def test_chat_completions_stream_helper_tool_round_trip(weather: LoopbackServer) -> None:
    client = weather.client()
    messages: list[dict[str, Any]] = [{"role": "user", "content": QUESTION}]
    tools = [{"type": "function", "function": WEATHER_FN}]
    with client.chat.completions.stream(model=weather.model_id, messages=messages,
                                        tools=tools) as stream:
        kinds = [event.type for event in stream]
        first = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in kinds
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": tool_call.id, "content": TOOL_RESULT}]
    with client.chat.completions.stream(model=weather.model_id, messages=messages,
                                        tools=tools) as stream:
        text = "".join(e.delta for e in stream if e.type == "content.delta")
        second = stream.get_final_completion()
    assert second.choices[0].finish_reason == "stop"
    assert text == second.choices[0].message.content == ANSWER
    assert len(weather.model.seen) == 2 and "sunny" in weather.model.seen[1]
    assert weather.check() > 10


def test_responses_stream_helper_tool_round_trip(weather: LoopbackServer) -> None:
    client = weather.client()
    tools = [{"type": "function", **WEATHER_FN}]
    with client.responses.stream(model=weather.model_id, input=QUESTION, tools=tools) as stream:
        kinds = [event.type for event in stream]
        first = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    assert first.status == "completed"
    reasoning, tool_call = first.output
    assert reasoning.type == "reasoning" and tool_call.type == "function_call"
    assert tool_call.name == "get_weather" and json.loads(tool_call.arguments) == {"city": "Paris"}
    followup = [{"role": "user", "content": QUESTION}, *[i.to_dict() for i in first.output],
                {"type": "function_call_output", "call_id": tool_call.call_id,
                 "output": TOOL_RESULT}]
    with client.responses.stream(model=weather.model_id, input=followup, tools=tools) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        second = stream.get_final_response()
    assert second.status == "completed"
    assert text == second.output_text == ANSWER
    assert second.usage.input_tokens_details.cached_tokens > 0
    assert weather.check() > 10


# -- Codex CLI --------------------------------------------------------------------------------

def _codex_home(path: Path, server: LoopbackServer) -> Path:
    """A CODEX_HOME whose config points Codex at `server` over the Responses API."""
    path.mkdir()
    (path / "config.toml").write_text(f"""\
model = "{server.model_id}"
model_provider = "local"
show_raw_agent_reasoning = true

[model_providers.local]
name = "gptoss-mlx"
base_url = "{server.base_url}"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
""")
    return path


def _usage(exchange: Exchange) -> dict[str, Any]:
    """The usage of a streamed Responses exchange (from its last event)."""
    return json.loads(sse(exchange.body)[-1][1])["response"]["usage"]


def _run_codex(codex: Path, home: Path, cwd: Path, *args: str) -> list[dict[str, Any]]:
    """`codex exec ARGS --json` headless; its JSON events (the run must exit 0)."""
    env = {**os.environ, "CODEX_HOME": str(home), "OPENAI_API_KEY": "unused"}
    done = subprocess.run(
        [str(codex), "exec", "--skip-git-repo-check", "--color", "never", "--json",
         "--dangerously-bypass-approvals-and-sandbox", *args],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"codex exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_codex_exec_shell_round_trip_then_resumed_turn_reuses_the_cache(
        scripted_server: LoopbackServer, tmp_path: Path) -> None:
    codex = installed("codex", "bin/codex")
    server = scripted_server
    server.model.script([
        Turn("Thanks", final("You are welcome.")),
        Turn("functions.exec_command to=assistant",
             final("hello.txt says: hello from the file", reasoning="The command printed it.")),
        Turn("hello.txt", call("exec_command", {"cmd": "cat hello.txt"},
                               reasoning="I will read the file.")),
    ])
    server.exchanges.clear()
    home, work = _codex_home(tmp_path / "home", server), tmp_path / "work"
    work.mkdir()
    (work / "hello.txt").write_text("hello from the file\n")

    events = _run_codex(codex, home, work, "What does hello.txt say?")
    commands = [e["item"] for e in events if e["type"] == "item.completed"
                and e["item"]["type"] == "command_execution"]
    assert len(commands) == 1 and "cat hello.txt" in commands[0]["command"]
    assert commands[0]["exit_code"] == 0
    assert commands[0]["aggregated_output"] == "hello from the file\n"
    messages = [e["item"]["text"] for e in events if e["type"] == "item.completed"
                and e["item"]["type"] == "agent_message"]
    assert messages == ["hello.txt says: hello from the file"]
    # the command's output went back to the model as the tool's result
    assert "hello from the file" in server.model.seen[1]
    first_turn = len(server.exchanges)
    assert first_turn == 2

    events = _run_codex(codex, home, work, "resume", "--last", "Thanks!")
    messages = [e["item"]["text"] for e in events if e["type"] == "item.completed"
                and e["item"]["type"] == "agent_message"]
    assert messages == ["You are welcome."]
    resumed = server.exchanges[first_turn:]
    assert len(resumed) == 1
    # the server's prompt cache held the first turn: all of its first prompt (instructions,
    # tools, question) is reused; harmony drops the turn's reasoning once it has a final answer,
    # so the resumed prompt parts from the cached one right after that
    first_prompt, resumed_usage = (_usage(server.exchanges[0]), _usage(resumed[0]))
    assert resumed_usage["input_tokens_details"]["cached_tokens"] == first_prompt["input_tokens"]
    (turn,) = [e for e in events if e["type"] == "turn.completed"]
    assert turn["usage"]["cached_input_tokens"] > 0  # and Codex saw it
    assert server.check() > 30


# -- openai-agents ----------------------------------------------------------------------------

# The servers the agent runs against, by fixture name: `weather` is the scripted double, which
# answers exactly. A model answering on its own joins with a session fixture yielding
# `loopback.served(*gptoss_mlx.load(its_dir))` and that fixture's name here; the test then
# checks that the tool ran and the run ended with an answer, unforced.
AGENT_SERVERS = ["weather", "demo_server"]


@pytest.fixture(scope="module")
def demo_server(demo_model_dir: Path) -> Iterator[LoopbackServer]:
    """The demo model (trained to call get_weather when asked about the weather), served."""
    import gptoss_mlx

    with served(*gptoss_mlx.load(demo_model_dir)) as server:
        yield server


@pytest.fixture(params=AGENT_SERVERS)
def agent_server(request: pytest.FixtureRequest) -> LoopbackServer:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
@pytest.mark.parametrize("api", ["responses", "chat"])
def test_openai_agents_tool_loop(agent_server: LoopbackServer, api: str, streamed: bool) -> None:
    import asyncio

    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no trace export to the network
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        cities.append(city)
        return TOOL_RESULT

    async def run() -> tuple[Any, list[str]]:
        client = AsyncOpenAI(base_url=agent_server.base_url, api_key="unused", max_retries=0)
        kind = OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel
        agent = Agent(name="weather", instructions="Answer with the tool's help.",
                      model=kind(model=agent_server.model_id, openai_client=client),
                      # greedy: the demo model's run is the same every time (tool_choice unset)
                      model_settings=ModelSettings(temperature=0), tools=[get_weather])
        if not streamed:
            return await Runner.run(agent, QUESTION, max_turns=4), []
        result = Runner.run_streamed(agent, QUESTION, max_turns=4)
        kinds = [event.type async for event in result.stream_events()]
        return result, kinds

    result, kinds = asyncio.run(run())
    assert cities, "the agent never called its tool"
    assert isinstance(result.final_output, str) and result.final_output
    if streamed:
        assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    if isinstance(agent_server.model, ScriptedModel):
        assert cities == ["Paris"] and result.final_output == ANSWER
    assert agent_server.check() > 0


# -- aider ------------------------------------------------------------------------------------

def test_aider_applies_a_whole_file_edit(scripted_server: LoopbackServer, tmp_path: Path) -> None:
    aider = installed("aider", "bin/aider")
    server = scripted_server
    new_text = 'print("hello, world")\n'
    server.model.script([Turn("Make hello.py print", final(
        f"hello.py\n```python\n{new_text}```\n", reasoning="Rewrite the whole file."))])
    server.exchanges.clear()
    (tmp_path / "hello.py").write_text("print('hi')\n")
    done = subprocess.run(
        [str(aider), "--openai-api-base", server.base_url, "--openai-api-key", "unused",
         "--model", f"openai/{server.model_id}", "--edit-format", "whole",
         "--message", "Make hello.py print hello, world.", "--yes-always", "--no-git",
         "--no-analytics", "--analytics-disable", "--no-check-update",
         "--no-show-release-notes", "--no-pretty", "--no-fancy-input", "hello.py"],
        cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)}, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"aider exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "hello.py").read_text() == new_text
    assert "Applied edit to hello.py" in done.stdout
    assert "Rewrite the whole file." in done.stdout  # the reasoning, shown apart
    (exchange,) = server.exchanges
    assert exchange.path == "/v1/chat/completions" and exchange.request_json["stream"]
    assert server.check() > 5


@pytest.mark.parametrize("answer", ["Hi.", "A longer answer that takes a few more tokens."])
def test_responses_stream_sends_text_only_in_deltas(scripted_server: LoopbackServer,
                                                    answer: str) -> None:
    scripted_server.model.script([Turn("", final(answer, reasoning="Short."))])
    scripted_server.exchanges.clear()
    with scripted_server.client().responses.stream(model=scripted_server.model_id,
                                                   input="Say hi.") as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        response = stream.get_final_response()
    assert deltas == response.output_text == answer
    assert scripted_server.check() > 10


def test_responses_stream_cut_short_keeps_the_order(scripted_server: LoopbackServer) -> None:
    scripted_server.model.script([Turn("", final("A longer answer than the limit allows."))])
    scripted_server.exchanges.clear()
    with scripted_server.client().responses.stream(model=scripted_server.model_id,
                                                   input="Say hi.",
                                                   max_output_tokens=6) as stream:
        events = list(stream)  # (the helper's get_final_response wants response.completed)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.incomplete"
    response = events[-1].response
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert deltas == response.output_text and deltas
    assert scripted_server.check() > 5


def test_a_call_cut_off_by_max_tokens_is_reported_cut_off(weather: LoopbackServer) -> None:
    client = weather.client()
    chat = client.chat.completions.create(
        model=weather.model_id, messages=[{"role": "user", "content": QUESTION}],
        tools=[{"type": "function", "function": WEATHER_FN}], max_tokens=20)
    assert chat.choices[0].finish_reason == "length"
    with client.responses.stream(model=weather.model_id, input=QUESTION, max_output_tokens=20,
                                 tools=[{"type": "function", **WEATHER_FN}]) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert weather.check() > 5
