"""The demo model's synthetic corpus: harmony conversations rendered by openai-harmony.

Each conversation is what our runtime renders (system message with a reasoning effort and a
date, optional developer instructions and function tools, a user message), then the assistant's
`analysis` message and either a `final` answer or, when an offered tool fits the request, a
commentary call `to=functions.NAME <|constrain|>json`, the tool's result, a second analysis and a
final answer that uses the result. Three task families: word transforms (no tool), a weather
lookup (`get_weather` {"city"}), a shell command (`exec_command` {"cmd"}, as Codex CLI offers it).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from gptoss_mlx.chat.harmony import HarmonyRenderer, SystemOptions, tool_result
from gptoss_mlx.chat.messages import Message
from gptoss_mlx.chat.tokenizer import END, RETURN, Tokenizer

WORDS = (
    "apple river stone cloud garden silver window pencil rocket forest candle mirror planet "
    "tiger ocean bridge yellow summer winter music paper orange castle dragon lemon marble "
    "spider violet basket copper island jacket kitten ladder meadow needle pepper rabbit "
    "saddle tunnel velvet wizard anchor bottle carpet donkey engine falcon goblet harbor"
).split()
CITIES = (
    "Paris London Berlin Madrid Rome Tokyo Lisbon Vienna Prague Dublin Oslo Cairo Lima Seoul "
    "Toronto Chicago Boston Denver Sydney Mumbai Delhi Istanbul Athens Warsaw Zurich Geneva "
    "Helsinki Stockholm Amsterdam Brussels Nairobi Lagos Bangkok Singapore Manila Jakarta Hanoi "
    "Dallas Seattle Austin Miami Phoenix Montreal Vancouver Havana Bogota Santiago Quito"
).split()
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy")
COMMANDS = (
    "ls", "ls -la", "pwd", "git status", "git log --oneline", "git diff", "date", "whoami",
    "uname -a", "df -h", "cat README.md", "cat setup.py", "wc -l main.py", "python --version",
    "ls src", "ls tests", "du -sh .", "head -n 5 notes.txt", "echo hello", "make test",
)
FILES = ("README.md", "main.py", "setup.py", "notes.txt", "Makefile", "app.js", "index.html",
         "config.toml", "data.csv", "LICENSE", "src", "tests", "docs", "build.sh")
INSTRUCTIONS = (
    "Answer briefly.", "Be concise and friendly.", "You are a helpful assistant.",
    "Keep answers short.", "Use tools when they help.", "Reply in plain text.",
)

WEATHER_TOOL = {"name": "get_weather", "description": "Get the current weather in a city.",
                "parameters": {"type": "object", "properties": {
                    "city": {"type": "string", "description": "The city name."}},
                    "required": ["city"]}}
SHELL_TOOL = {"name": "exec_command", "description": "Runs a command in a shell.",
              "parameters": {"type": "object", "properties": {
                  "cmd": {"type": "string", "description": "Shell command to execute."},
                  "workdir": {"type": "string", "description": "Working directory."}},
                  "required": ["cmd"]}}
OTHER_TOOLS = (
    {"name": "get_time", "description": "Get the current time in a timezone.",
     "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                    "required": ["timezone"]}},
    {"name": "search_docs", "description": "Search the documentation.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                    "required": ["query"]}},
    {"name": "send_email", "description": "Send an email.",
     "parameters": {"type": "object", "properties": {"to": {"type": "string"},
                                                     "body": {"type": "string"}},
                    "required": ["to", "body"]}},
)
FAMILIES = ("word", "weather", "shell")


@dataclass
class Conversation:
    """One sampled conversation: the prompt's pieces and the assistant's expected turn."""

    family: str
    effort: str
    date: str
    instructions: str | None
    tools: list[dict[str, Any]]
    user: str
    analysis: str
    answer: str = ""  # the final answer (after the tool result, when there is a call)
    call: tuple[str, dict[str, Any]] | None = None  # (tool name, arguments)
    result: str = ""  # the tool's result, as the tool would return it
    after_analysis: str = ""
    facts: list[str] = field(default_factory=list)  # result values an honest answer repeats

    @property
    def fitting_tool(self) -> str | None:
        """The offered tool that fits the request, if any."""
        return self.call[0] if self.call else None


def _transform(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    op = rng.choice(("upper", "reverse", "length"))
    if op == "upper":
        user = rng.choice((f"Uppercase the word {word}.", f"Write {word} in capital letters.",
                           f"What is {word} in uppercase?"))
        return user, f"The user wants {word} in uppercase.", word.upper()
    if op == "reverse":
        user = rng.choice((f"Reverse the word {word}.", f"Spell {word} backwards.",
                           f"What is {word} reversed?"))
        return user, f"The user wants {word} reversed.", word[::-1]
    user = rng.choice((f"How many letters are in {word}?", f"Count the letters of {word}."))
    return user, f"The user wants the length of {word}.", f"{word} has {len(word)} letters."


def sample(rng: random.Random) -> Conversation:
    """One random conversation of a random family."""
    family = rng.choice(FAMILIES)
    effort = rng.choice(("low", "medium", "high"))
    date = f"{rng.randint(2024, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    instructions = rng.choice(INSTRUCTIONS) if rng.random() < 0.4 else None
    tools = [t for t in (WEATHER_TOOL, SHELL_TOOL) if rng.random() < 0.4]
    if rng.random() < 0.25:
        tools.append(rng.choice(OTHER_TOOLS))
    fits = {"weather": WEATHER_TOOL, "shell": SHELL_TOOL}.get(family)
    if fits is not None and rng.random() < 0.85 and fits not in tools:
        tools.append(fits)
    rng.shuffle(tools)
    offered = fits is not None and fits in tools
    common = dict(family=family, effort=effort, date=date, instructions=instructions, tools=tools)
    if family == "word":
        user, analysis, answer = _transform(rng)
        return Conversation(**common, user=user, analysis=analysis, answer=answer)
    if family == "weather":
        city = rng.choice(CITIES)
        user = rng.choice((f"What is the weather in {city}?", f"How warm is it in {city}?",
                           f"Weather in {city} right now?", f"Is it raining in {city}?"))
        if not offered:
            return Conversation(**common, user=user,
                                analysis="The user asks about the weather, but I have no tool.",
                                answer=f"I cannot check the weather in {city} right now.")
        temp, cond = rng.randint(-10, 35), rng.choice(CONDITIONS)
        result = json.dumps({"city": city, "temperature_c": temp, "conditions": cond})
        return Conversation(
            **common, user=user, analysis=f"The user asks about the weather in {city}. "
            "I will call get_weather.", call=("get_weather", {"city": city}), result=result,
            after_analysis=f"The tool says {temp} C and {cond}.",
            answer=f"It is {temp} C and {cond} in {city}.", facts=[str(temp), cond])
    cmd = rng.choice(COMMANDS)
    user = rng.choice((f"Run {cmd}", f"Please run `{cmd}` in the shell.",
                       f"Execute this command: {cmd}", f"What does `{cmd}` print?"))
    if not offered:
        return Conversation(**common, user=user,
                            analysis="The user wants a command run, but I have no shell tool.",
                            answer=f"I cannot run {cmd} here.")
    out = " ".join(rng.sample(FILES, rng.randint(1, 3)))
    return Conversation(
        **common, user=user, analysis=f"The user wants me to run {cmd}. I will call exec_command.",
        call=("exec_command", {"cmd": cmd}), result=out,
        after_analysis=f"The command printed {out}.", answer=f"It printed: {out}",
        facts=out.split())


class CorpusRenderer:
    """Renders conversations into token ids and the mask of the tokens the model must produce."""

    def __init__(self, tokenizer: Tokenizer):
        self.renderer = HarmonyRenderer(tokenizer)

    def prompt(self, conv: Conversation, with_call: bool = False) -> list[int]:
        """The prompt our runtime renders; `with_call` adds the call and the tool's result."""
        ids, _ = self._pieces(conv, upto_result=with_call)
        return ids + self.renderer.assistant_start()

    def render(self, conv: Conversation) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and a 0/1 mask of the assistant's tokens."""
        return self._pieces(conv, upto_result=False, full=True)

    def _pieces(self, conv: Conversation, upto_result: bool,
                full: bool = False) -> tuple[list[int], list[int]]:
        r = self.renderer
        ids = r.system(SystemOptions(reasoning_effort=conv.effort, current_date=conv.date),
                       function_tools=bool(conv.tools))
        ids += r.developer(conv.instructions, conv.tools)
        ids += r.message(Message("user", conv.user))
        mask = [0] * len(ids)

        def assistant(msgs: list[Message], last: bool) -> None:
            for i, m in enumerate(msgs):
                piece = r.message(m)
                if last and i == len(msgs) - 1 and piece[-1] == END:
                    piece[-1] = RETURN  # the model ends its turn with <|return|>
                given = 2 if i == 0 else 0  # the runtime writes the first <|start|>assistant
                ids.extend(piece)
                mask.extend([0] * given + [1] * (len(piece) - given))

        analysis = Message("assistant", conv.analysis, channel="analysis")
        if conv.call is None:
            if full:
                assistant([analysis, Message("assistant", conv.answer, channel="final")], True)
            return ids, mask
        name, args = conv.call
        call = Message("assistant", json.dumps(args), channel="commentary",
                       recipient=f"functions.{name}", content_type="<|constrain|>json")
        if full or upto_result:
            assistant([analysis, call], False)
            res = r.message(tool_result(name, conv.result))
            ids.extend(res)
            mask.extend([0] * len(res))
        if full:
            assistant([Message("assistant", conv.after_analysis, channel="analysis"),
                       Message("assistant", conv.answer, channel="final")], True)
        return ids, mask
