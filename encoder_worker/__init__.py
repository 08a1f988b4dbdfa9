"""Encoder role: decode + preprocess media, run vision towers + projectors, own the embedding
store, publish embeddings straight to decoder inboxes."""
