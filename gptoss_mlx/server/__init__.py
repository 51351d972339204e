"""The OpenAI-compatible HTTP server (`gptoss-mlx serve`): chat completions, the Responses API,
models and health, over one model worker thread with a prefix-reusing prompt cache.

Modules: app (routes, OpenAPI description), guard (API key and body size, before the body is
read), admission (running and waiting requests, 429s), prompt_bound (a huge prompt refused early),
schemas (request bodies), engine (worker, queue, cancellation, shutdown), prompt_cache (cache
slots), prompting (tools, sampling, rendering), output (harmony messages as
output items), chat_completions and responses (the two wire formats), transport (SSE,
disconnects), errors (OpenAI error bodies).
"""
