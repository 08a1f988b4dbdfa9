"""Chat messages -> prompt text -> token ids, through the model's Jinja chat template.

Messages are validated here (roles, content parts) so every mistake is a 400 naming the field,
then given the content format the template expects (vLLM's "string" / "openai", "auto" read from
the template's syntax tree). The server's template renders in-process; a request's own template
only when trusted, and then in frontend.template_sandbox's worker processes.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
from jinja2 import nodes

from frontend.errors import RequestError
from frontend.template_sandbox import TemplateSandbox, sandbox_environment

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool")
# Message keys passed to the template as they are; anything else is refused, not silently dropped.
_PASSTHROUGH_KEYS = ("name", "tool_call_id")
_UNSUPPORTED_KEYS = ("tool_calls", "function_call", "audio")
CONTENT_FORMATS = ("auto", "string", "openai")


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
    # What frontend.media.parse leaves where a media part was (it refuses client-sent ones).
    "image": lambda part, where: {"type": "image"},
    "video": lambda part, where: {"type": "video"},
    "audio": lambda part, where: {"type": "audio"},
    "image_url": _unsupported_modality("image"),
    "input_image": _unsupported_modality("image"),
    "input_audio": _unsupported_modality("audio"),
    "audio_url": _unsupported_modality("audio"),
    "video_url": _unsupported_modality("video"),
}


# -- messages -----------------------------------------------------------------------------------

def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
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
    return parts


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Checked copies of OpenAI chat messages: content a string, a list of parts ({"type": "text",
    "text": ...} or {"type": <modality>}), or None (assistant only). See `to_content_format`."""
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
        if content is None and role != "assistant":
            raise RequestError(f"{where}.content is required", f"{where}.content")
        clean = {"role": role,
                 "content": None if content is None else _content(content, f"{where}.content")}
        clean.update({k: msg[k] for k in _PASSTHROUGH_KEYS if k in msg})
        out.append(clean)
    return out


# -- content format -----------------------------------------------------------------------------
# As vLLM's --chat-template-content-format: "string" templates print message['content'], "openai"
# templates loop over its parts. "auto" reads which from the template's syntax tree.

def to_content_format(messages: list[dict[str, Any]], content_format: str,
                      placeholders: dict[str, str]) -> list[dict[str, Any]]:
    """Validated messages with every content in one shape: a list of parts ("openai"), or one
    string ("string": text parts joined by newlines, after the placeholder text of each media
    item the text does not already hold, as vLLM does)."""
    out = []
    for i, msg in enumerate(messages):
        content = msg["content"]
        if content_format == "openai":
            if content is None:
                content = []
            elif isinstance(content, str):
                content = [{"type": "text", "text": content}]
            else:
                content = [dict(p) for p in content]
        elif isinstance(content, list):
            content = _as_string(content, placeholders, f"messages[{i}].content")
        elif content is None:
            content = ""
        out.append({**msg, "content": content})
    return out


def _as_string(parts: list[dict[str, Any]], placeholders: dict[str, str], where: str) -> str:
    text = "\n".join(p["text"] for p in parts if p["type"] == "text")
    counts: dict[str, int] = {}
    for j, p in enumerate(parts):
        if p["type"] != "text":
            if p["type"] not in placeholders:
                raise RequestError(f"{where}[{j}]: this model has no placeholder for "
                                   f"{p['type']} input", f"{where}[{j}].type")
            counts[placeholders[p["type"]]] = counts.get(placeholders[p["type"]], 0) + 1
    missing = []
    for placeholder, n in counts.items():
        n -= text.count(placeholder)  # placed by the user in the text: kept where they are
        if n < 0:
            raise RequestError(f"{where} has more {placeholder} placeholders in its text than "
                               "media items", where)
        missing += [placeholder] * n
    return "\n".join([*missing, text]) if missing else text


def _reads(node: nodes.Node, names: set[str], key: str | None) -> bool:
    """Whether `node` is a variable in `names` (key None) or its `key` item/attribute, maybe
    filtered, tested, sliced or chosen by an inline if."""
    if isinstance(node, (nodes.Filter, nodes.Test)):
        return node.node is not None and _reads(node.node, names, key)
    if isinstance(node, nodes.CondExpr):
        return _reads(node.expr1, names, key) or (node.expr2 is not None
                                                  and _reads(node.expr2, names, key))
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        return _reads(node.node, names, key)
    if key is None:
        return isinstance(node, nodes.Name) and node.name in names
    if isinstance(node, nodes.Getitem):
        picked = isinstance(node.arg, nodes.Const) and node.arg.value == key
    elif isinstance(node, nodes.Getattr):
        picked = node.attr == key
    else:
        return False
    return picked and isinstance(node.node, nodes.Name) and node.node.name in names


def _bindings(root: nodes.Template) -> list[tuple[str, nodes.Node]]:
    """(variable, expression) for each `{% set %}` and each macro argument passed by a call."""
    out = [(a.target.name, a.node) for a in root.find_all(nodes.Assign)
           if isinstance(a.target, nodes.Name)]
    macros = {m.name: [p.name for p in m.args] for m in root.find_all(nodes.Macro)}
    for call in root.find_all(nodes.Call):
        params = macros.get(call.node.name) if isinstance(call.node, nodes.Name) else None
        if params:
            out += list(zip(params, call.args))
            out += [(k.key, k.value) for k in call.kwargs if k.key in params]
    return out


def _bound_to(bindings: list[tuple[str, nodes.Node]], names: set[str], key: str | None) -> set[str]:
    """Variables holding `names` (or their `key`), directly or through other such variables."""
    found: set[str] = set()
    grew = True
    while grew:
        grew = False
        for var, expr in bindings:
            if var not in found and (_reads(expr, names, key) or _reads(expr, found, None)):
                found.add(var)
                grew = True
    return found


def _loops_over_content(root: nodes.Template) -> bool:
    bindings = _bindings(root)
    loops = list(root.find_all(nodes.For))
    message_lists = {"messages"} | _bound_to(bindings, {"messages"}, None)
    messages = {f.target.name for f in loops
                if isinstance(f.target, nodes.Name) and _reads(f.iter, message_lists, None)}
    messages |= _bound_to(bindings, messages, None)
    contents = _bound_to(bindings, messages, "content")
    return any(_reads(f.iter, messages, "content") or _reads(f.iter, contents, None)
               for f in loops)


# The fallback for a template jinja2 cannot parse (it will fail to render anyway).
_ITERATES_CONTENT = re.compile(r"for\s+\w+\s+in\s+\w+(\[['\"]content['\"]\]|\.content)")
_PARSER = sandbox_environment()


@functools.lru_cache(maxsize=64)
def detect_content_format(template: str) -> str:
    """"openai" if the template loops over a message's content, else "string" (cached by text)."""
    try:
        iterates = _loops_over_content(_PARSER.parse(template))
    except Exception:  # syntax errors, or a syntax tree too deep to walk
        iterates = _ITERATES_CONTENT.search(template) is not None
    return "openai" if iterates else "string"


# -- the renderer -------------------------------------------------------------------------------

_RESERVED_KWARGS = ("messages", "tokenize", "chat_template", "add_generation_prompt",
                    "continue_final_message", "conversation")


class ChatRenderer:
    """Renders chat requests with the template given at startup (file), else the tokenizer's.

    That template runs in-process through the tokenizer's `apply_chat_template` (exact parity
    with transformers). A request's own `chat_template` is refused unless
    `trust_request_template`; then it runs in `sandbox` (a `TemplateSandbox` made on first use)
    or, with `sandbox_request_templates=False` (offline, where it is the caller's own code),
    in-process like the server's. `max_prompt_chars` bounds the rendered prompt before it is
    tokenized. Call `close()` to stop the sandbox's workers."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None, *,
                 content_format: str = "auto",
                 media_placeholders: dict[str, str] | None = None,
                 trust_request_template: bool = False,
                 sandbox_request_templates: bool = True,
                 sandbox: TemplateSandbox | None = None,
                 max_prompt_chars: int | None = None):
        if content_format not in CONTENT_FORMATS:
            raise ValueError(f"content_format must be one of {CONTENT_FORMATS}, "
                             f"got {content_format!r}")
        self.tokenizer = tokenizer
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        self.content_format = content_format
        # modality -> the text the template would print for one item (e.g. {"image": "<image>"})
        self.media_placeholders = dict(media_placeholders or {})
        self.trust_request_template = trust_request_template
        self.sandbox_request_templates = sandbox_request_templates
        self.max_prompt_chars = max_prompt_chars
        self._sandbox = sandbox
        self._owns_sandbox = sandbox is None
        self._sandbox_lock = threading.Lock()
        self._closed = False

    def render(
        self,
        messages: Any,
        *,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> RenderedChat:
        """``add_generation_prompt`` None means: True unless continuing the final message.
        ``chat_template`` is a request's own template (see the class docstring)."""
        self.check_request_template(chat_template)
        template = chat_template or self.template
        if not template:
            raise RequestError(
                "this model has no chat template: start the server with --chat-template FILE, "
                "or use /v1/completions",
                "messages",
            )
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        if add_generation_prompt and continue_final_message:
            raise RequestError(
                "add_generation_prompt and continue_final_message cannot both be true",
                "continue_final_message",
            )
        msgs = validate_messages(messages)
        if continue_final_message and msgs[-1]["role"] != "assistant":
            raise RequestError(
                "continue_final_message needs the last message to be from the assistant",
                "continue_final_message",
            )
        kwargs = dict(chat_template_kwargs or {})
        for reserved in _RESERVED_KWARGS:
            if reserved in kwargs:
                raise RequestError(f"chat_template_kwargs cannot set {reserved!r}",
                                   "chat_template_kwargs")
        if chat_template is not None and self.sandbox_request_templates:
            prompt = self._render_sandboxed(chat_template, msgs, add_generation_prompt,
                                            continue_final_message, kwargs)
        else:
            prompt = self._render_in_process(template, msgs, add_generation_prompt,
                                             continue_final_message, kwargs,
                                             from_request=chat_template is not None)
        if self.max_prompt_chars is not None and len(prompt) > self.max_prompt_chars:
            raise RequestError(f"the rendered chat has {len(prompt)} characters, more than this "
                               f"server's limit of {self.max_prompt_chars}", "messages")
        # The template already wrote the special tokens (bos, role markers): add none.
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return RenderedChat(prompt, list(ids))

    def check_request_template(self, chat_template: Any) -> None:
        """The 400 for a request's own template this renderer will not run (callers may check
        before fetching media; `render` checks too)."""
        if chat_template is None:
            return
        if not self.trust_request_template:
            raise RequestError(
                "this server does not run chat templates sent with requests; its operator "
                "can allow them with --trust-request-chat-template", "chat_template")
        if not isinstance(chat_template, str) or not chat_template:
            raise RequestError("chat_template must be a non-empty string", "chat_template")

    def _format(self, template: str) -> str:
        if self.content_format == "auto":
            return detect_content_format(template)
        return self.content_format

    def _render_in_process(self, template: str, msgs: list[dict[str, Any]],
                           add_generation_prompt: bool, continue_final_message: bool,
                           kwargs: dict[str, Any], from_request: bool) -> str:
        msgs = to_content_format(msgs, self._format(template), self.media_placeholders)
        try:
            prompt = self.tokenizer.apply_chat_template(
                msgs,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **kwargs,
            )
        except jinja2.TemplateSyntaxError as e:
            raise RequestError(f"chat template syntax error at line {e.lineno}: {_one_line(e)}",
                               "chat_template" if from_request else "messages") from None
        except (jinja2.TemplateError, ValueError) as e:
            # raise_exception() in the template, or transformers failing to find the final
            # message to continue: texts written for the user.
            raise RequestError(f"chat template error: {_one_line(e)}", "messages") from None
        except Exception as e:
            # The template tripping over odd input (a None, a wrong type): still the request's.
            log.debug("chat template failed", exc_info=True)
            raise RequestError(f"the chat template cannot render these messages "
                               f"({type(e).__name__})", "messages") from None
        if not isinstance(prompt, str):
            raise RequestError("the chat template did not render to a string", "messages")
        return prompt

    def _render_sandboxed(self, template: str, msgs: list[dict[str, Any]],
                          add_generation_prompt: bool, continue_final_message: bool,
                          kwargs: dict[str, Any]) -> str:
        with self._sandbox_lock:
            if self._closed:
                raise RuntimeError("the chat renderer is closed")
            if self._sandbox is None:
                self._sandbox = TemplateSandbox()
            sandbox = self._sandbox
        variables = {k: v for k, v in self.tokenizer.special_tokens_map.items() if v is not None}
        variables.update(kwargs)  # as transformers: kwargs override special tokens
        try:
            json.dumps([msgs, variables])
        except (TypeError, ValueError, RecursionError):
            raise RequestError("chat_template_kwargs must be JSON values",
                               "chat_template_kwargs") from None
        prompt = sandbox.render({
            "template": template, "messages": msgs, "content_format": self.content_format,
            "placeholders": self.media_placeholders, "variables": variables,
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            # One past the cap: a longer prompt then gets the clearer "messages" error below.
            "max_chars": None if self.max_prompt_chars is None else self.max_prompt_chars + 1,
        })
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from escapes in the template
            raise RequestError("the chat template rendered invalid text", "chat_template") from None
        return prompt

    def close(self) -> None:
        """Stops the sandbox's worker processes (if this renderer made them)."""
        with self._sandbox_lock:
            sandbox, self._sandbox, self._closed = self._sandbox, None, True
        if sandbox is not None and self._owns_sandbox:
            sandbox.close()


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
