"""The in-process Python API: `LLM` (`llm`) over an in-process engine core, with its media run
through the encoder slice in-process (`media`)."""
