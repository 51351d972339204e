"""The harmony chat format for gpt-oss.

- `tokenizer`: `load_tokenizer(model_dir)` -> `Tokenizer` (o200k_harmony from the folder's
  `o200k_base.tiktoken`, or derived from its `tokenizer.json`, offline), special-token ids,
  `STOP_TOKENS`, `StreamDecoder`.
- `messages`: `Message` (one harmony message) and `ToolCall`.
- `harmony`: `HarmonyRenderer` renders OpenAI-style chats (`render_chat`) or single messages
  through openai-harmony; `SystemOptions` (effort, date, cutoff, identity); `from_openai`,
  `drop_past_reasoning`, `tool_result`.
- `parser`: `HarmonyStreamParser`, a tolerant incremental parser of generated tokens emitting
  `ParseEvent`s (message start, content delta, message end).

The format knows nothing of generation: `gptoss_mlx.session.ChatSession`, a multi-turn chat
reusing its KV cache, sits above this package and `gptoss_mlx.generate`.
"""
