"""`tool_choice: "required"` or a named function, enforced while the model writes a header.

The model may still reason first (the analysis channel). Any other message it starts becomes a
function call: when it names its channel (the token after `<|channel|>`), the header is written
for it as `commentary to=functions.NAME <|constrain|>json<|message|>`, the way harmony renders a
call, or as `commentary to=functions` when any function will do (the model then writes `.name`).
A header that already names a recipient (`<|start|>assistant to=functions.x<|channel|>...`) is
left alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import START, Tokenizer


class ToolCallForcing:
    """The header tokens to write instead of the model's choice of channel."""

    def __init__(self, tokenizer: Tokenizer, function: str | None = None):
        text = "commentary to=functions"
        if function is not None:
            text += f".{function} <|constrain|>json<|message|>"
        self.header = tokenizer.encode(text, allow_special=True)
        (self.analysis,) = tokenizer.encode("analysis")
        self._tokenizer = tokenizer

    def header_after(self, generated: Sequence[int], proposed: int) -> list[int]:
        """What to write instead of `proposed`, the channel name's first token the model chose
        right after `generated` (which ends in `<|channel|>`); [] keeps the model's choice."""
        if proposed == self.analysis:
            return []
        start = max((i for i, t in enumerate(generated) if t == START), default=-1)
        if " to=" in self._tokenizer.decode(generated[start + 1:]):
            return []
        return list(self.header)
