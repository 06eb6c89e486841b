"""lorabot serve and the remote engine: the OpenAI API, skills, limits, the page, backend = "openai"."""
