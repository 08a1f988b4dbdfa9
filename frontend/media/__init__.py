"""Media in a request, shared by the HTTP tier and the offline `LLM`: content parts parsed and
resolved (`parse`: fetch, probe, key, geometry), fetched under the SSRF and size guards (`fetch`),
probed from their headers (`probe`), user embeddings loaded through the guarded path (`embeds`),
and dispatched to the encoder pool (`inputs`, `encoder_pool`)."""
