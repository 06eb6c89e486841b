"""``lorabot serve``: an OpenAI-compatible HTTP API and a try-it page over the bot's engine.

One more front-end beside the transports: it goes through the same ``bot.engine`` interface (requests
from every client batched together, each with its own adapter) and, for the skills, through the same
core. One job per module:

* ``app``: the aiohttp application, its routes and middlewares, and running it (``serve``);
* ``settings``: what ``lorabot serve``'s flags set (bind address, API key, limits) and their checks;
* ``errors``: OpenAI-shaped error JSON for every failure;
* ``schema``: validation of completion and chat requests into engine requests;
* ``openai_api``: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``;
* ``sse``: server-sent events as OpenAI's clients parse them;
* ``skills_api``: ``/v1/skills/<skill>``, lorabot's structured results (the same as ``lorabot ask --json``);
* ``base_view``: the engine seen without its adapters (a skill answered by the bare base model);
* ``lora_admin``: ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM's shapes);
* ``guard``: API key, Host check, request limits and the bounded number of requests in flight;
* ``metrics``: the Prometheus registry behind ``/metrics``;
* ``page``: the page at ``/`` (``page.html``: plain HTML and a little JavaScript).
"""
