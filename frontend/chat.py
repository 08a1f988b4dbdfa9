"""Chat messages -> prompt text -> token ids, through the model's Jinja chat template.

Messages are validated here (roles, content parts) so every mistake is a 400 naming the field.
Content parts are handled by type through `PART_HANDLERS`; media parts get their handlers when the
multimodal path lands, and until then they answer a clear 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jinja2

from frontend.errors import RequestError

ROLES = ("system", "developer", "user", "assistant", "tool")
# Message keys passed to the template as they are; anything else is refused, not silently dropped.
_PASSTHROUGH_KEYS = ("name", "tool_call_id")
_UNSUPPORTED_KEYS = ("tool_calls", "function_call", "audio")


class RenderedChat(NamedTuple):
    prompt: str
    prompt_token_ids: list[int]


def load_chat_template(path: str | None) -> str | None:
    """The text of a --chat-template file (None passes through)."""
    if path is None:
        return None
    return Path(path).read_text(encoding="utf-8")


# -- content parts ------------------------------------------------------------------------------

def _text_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    text = part.get("text")
    if not isinstance(text, str):
        raise RequestError(f"{where}.text must be a string", f"{where}.text")
    return {"type": "text", "text": text}


def _unsupported_modality(modality: str) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    def handler(part: dict[str, Any], where: str) -> dict[str, Any]:
        raise RequestError(
            f"{where}: {modality} input is not supported by this server yet "
            "(only text content parts are accepted)",
            f"{where}.type",
        )

    return handler


# Part type -> handler returning the part as the template sees it. Media types move to real
# handlers (fetch + probe + placeholder expansion) with the multimodal path.
PART_HANDLERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "text": _text_part,
    # What frontend.mm_parse leaves where a media part was (it refuses client-sent ones).
    "image": lambda part, where: {"type": "image"},
    "image_url": _unsupported_modality("image"),
    "input_image": _unsupported_modality("image"),
    "input_audio": _unsupported_modality("audio"),
    "audio_url": _unsupported_modality("audio"),
    "video_url": _unsupported_modality("video"),
}


# -- messages -----------------------------------------------------------------------------------

def _content(content: Any, where: str, as_string: bool) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of content parts", where)
    parts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if isinstance(part, str):  # vLLM accepts bare strings as text parts
            part = {"type": "text", "text": part}
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RequestError(f"{at} must be an object with a string `type`", f"{at}.type")
        handler = PART_HANDLERS.get(part["type"])
        if handler is None:
            raise RequestError(f"{at}.type: unknown content part type {part['type']!r}",
                               f"{at}.type")
        parts.append(handler(part, at))
    if as_string:
        # Templates that print message['content'] as a string get the text parts joined.
        return "\n".join(p["text"] for p in parts if p["type"] == "text")
    return parts


def validate_messages(messages: Any, as_string: bool = True) -> list[dict[str, Any]]:
    """Checked, normalized copies of OpenAI chat messages, ready for the template."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(f"{where} must be an object", where)
        role = msg.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}",
                               f"{where}.role")
        for key in msg:
            if key in _UNSUPPORTED_KEYS:
                raise RequestError(f"{where}.{key} is not supported", f"{where}.{key}")
            if key not in ("role", "content", *_PASSTHROUGH_KEYS):
                raise RequestError(f"{where}.{key} is not a known message field", f"{where}.{key}")
        content = msg.get("content")
        if content is None and role == "assistant":
            content = ""
        elif content is None:
            raise RequestError(f"{where}.content is required", f"{where}.content")
        clean = {"role": role, "content": _content(content, f"{where}.content", as_string)}
        clean.update({k: msg[k] for k in _PASSTHROUGH_KEYS if k in msg})
        out.append(clean)
    return out


# Templates that loop over message['content'] want OpenAI-style part lists; others want strings.
_ITERATES_CONTENT = re.compile(r"for\s+\w+\s+in\s+\w+(\[['\"]content['\"]\]|\.content)")


class ChatRenderer:
    """Renders chat requests with the template given at startup (file), else the tokenizer's."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None, *,
                 content_format: str = "auto",
                 media_placeholders: dict[str, str] | None = None,
                 trust_request_template: bool = False):
        self.tokenizer = tokenizer
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        # "auto" | "string" | "openai": see FrontendConfig.chat_template_content_format.
        self.content_format = content_format
        # modality -> the text the template would print for one item (e.g. {"image": "<image>"})
        self.media_placeholders = dict(media_placeholders or {})
        self.trust_request_template = trust_request_template

    def render(
        self,
        messages: Any,
        *,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> RenderedChat:
        """``add_generation_prompt`` None means: True unless continuing the final message."""
        template = chat_template or self.template
        if not template:
            raise RequestError(
                "this model has no chat template: start the server with --chat-template FILE, "
                "or use /v1/completions",
                "messages",
            )
        if not isinstance(template, str):
            raise RequestError("chat_template must be a string", "chat_template")
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        if add_generation_prompt and continue_final_message:
            raise RequestError(
                "add_generation_prompt and continue_final_message cannot both be true",
                "continue_final_message",
            )
        as_string = _ITERATES_CONTENT.search(template) is None
        msgs = validate_messages(messages, as_string=as_string)
        if continue_final_message and msgs[-1]["role"] != "assistant":
            raise RequestError(
                "continue_final_message needs the last message to be from the assistant",
                "continue_final_message",
            )
        kwargs = dict(chat_template_kwargs or {})
        for reserved in ("messages", "tokenize", "chat_template", "add_generation_prompt",
                         "continue_final_message", "conversation"):
            if reserved in kwargs:
                raise RequestError(f"chat_template_kwargs cannot set {reserved!r}",
                                   "chat_template_kwargs")
        try:
            prompt = self.tokenizer.apply_chat_template(
                msgs,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **kwargs,
            )
        except (jinja2.TemplateError, ValueError) as e:
            # raise_exception() in the template, bad syntax in a user template, or transformers
            # failing to find the final message to continue: the request's fault, so 400.
            raise RequestError(f"chat template error: {_one_line(e)}", "messages") from None
        if not isinstance(prompt, str):
            raise RequestError("the chat template did not render to a string", "messages")
        # The template already wrote the special tokens (bos, role markers): add none.
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return RenderedChat(prompt, list(ids))


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
