"""Building blocks of the LM decoders: TP-sharded linears and embeddings, RoPE, norm, activation.

Every parameter holds only this rank's shard and carries a `weight_loader` that slices the full
Hugging Face tensor, so checkpoints load unchanged at any tensor-parallel size.
"""
