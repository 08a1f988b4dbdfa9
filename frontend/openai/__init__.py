"""The OpenAI-compatible HTTP tier: the aiohttp server and its routes (`api_server`), request
bodies (`protocol`), the generating endpoints (`serving`) and the response shapes (`responses`)."""
