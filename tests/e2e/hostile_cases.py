"""Shared pieces of the hostile corpus: the Case record, the server context and body builders."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frontend.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

CHAT, COMPLETIONS, TOKENIZE, DETOKENIZE = ("/v1/chat/completions", "/v1/completions",
                                           "/tokenize", "/detokenize")
SCHEMAS = {CHAT: ChatCompletionRequest, COMPLETIONS: CompletionRequest,
           TOKENIZE: TokenizeRequest, DETOKENIZE: DetokenizeRequest}
JSON = {"Content-Type": "application/json"}
HUGE = 2**64 + 1
MB = 1 << 20


@dataclass
class Case:
    cls: str  # the class of hostile input, for grouping in reports
    name: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    method: str = "POST"
    statuses: tuple[int, ...] = tuple(range(400, 500))
    param: str | None = None  # the error's param must name this field (or a path under it)
    max_seconds: float = 30.0  # answered within this

    @property
    def id(self) -> str:
        return f"{self.cls}/{self.name}"


@dataclass
class Context:
    model: str  # a served model name
    vocab_size: int
    hidden_size: int  # of image embeddings (the LM's hidden size)
    image_token_id: int
    media_dir: Path  # holds allowed/ (the --allowed-local-media-path) and files outside it
    ssrf_base: str  # http://127.0.0.1:PORT of a live image host that must never be fetched
    marker: Path  # a pickle payload would create this file


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# -- body helpers ---------------------------------------------------------------------------------

def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def image_part(url: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": url if url is None else {"url": url}, **extra}


class Bodies:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def chat(self, **kw: Any) -> dict[str, Any]:
        body = {"model": self.ctx.model, "messages": user("hi"), "max_tokens": 2}
        body.update(kw)
        return body

    def completion(self, **kw: Any) -> dict[str, Any]:
        body = {"model": self.ctx.model, "prompt": "hi", "max_tokens": 2}
        body.update(kw)
        return body

    def tokenize(self, **kw: Any) -> dict[str, Any]:
        return {"model": self.ctx.model, "prompt": "hi", **kw}

    def detokenize(self, **kw: Any) -> dict[str, Any]:
        return {"model": self.ctx.model, "tokens": [1, 2], **kw}

    def base(self, path: str) -> dict[str, Any]:
        return {CHAT: self.chat, COMPLETIONS: self.completion, TOKENIZE: self.tokenize,
                DETOKENIZE: self.detokenize}[path]()

    def media(self, *parts: dict[str, Any]) -> bytes:
        return dumps(self.chat(messages=user([*parts, {"type": "text", "text": "?"}])))

