"""Decoder role: engine core (scheduler, KV block manager), executor, TP workers, model runner."""
