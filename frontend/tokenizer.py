"""Loading the checkpoint's tokenizer: local files only, and never the checkpoint's own code.

``trust_remote_code=False`` is explicit: left unset, transformers asks an interactive y/N question
for checkpoints that ship code, and a server must never wait on stdin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
