"""`engine serve`: an OpenAI-compatible HTTP front end over ``LLMEngine`` with vLLM-named metrics.

Modules, one job each:

- ``protocol``: pydantic models of the OpenAI requests and responses (validation lives here).
- ``errors``: OpenAI-style error objects and the handlers that turn bad input into a 400.
- ``detokenize``: incremental detokenization with stop strings, for streaming.
- ``async_engine``: the thread that drives ``engine.step()`` and the per-request asyncio streams.
- ``metrics``: Prometheus metrics with vLLM's names, types and labels.
- ``app``: the FastAPI routes (completions, chat, models, health, metrics) and SSE framing.
- ``launcher``: run the app with uvicorn in a background thread (tests, profiler).
- ``cli``: ``add_arguments(parser)`` / ``main(args)`` for the ``engine serve`` subcommand.
"""
