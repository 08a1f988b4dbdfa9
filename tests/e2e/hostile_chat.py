"""The chat classes of the hostile corpus: malformed messages, request chat templates (refused, or
bounded when trusted) and special tokens in text."""

from __future__ import annotations

from typing import Any

from hostile_cases import (
    CHAT,
    TOKENIZE,
    Bodies,
    Case,
    dumps,
    image_part,
    user,
)
from hostile_media import (
    data_url,
    png_bytes,
)


def messages(b: Bodies) -> list[Case]:
    table: dict[str, tuple[Any, dict[str, Any]]] = {
        "empty list": ([], {}),
        "not a list": ("hi", {}),
        "a number": (5, {}),
        "message is a string": (["hi"], {}),
        "message is null": ([None], {}),
        "empty message": ([{}], {}),
        "unknown role": ([{"role": "root", "content": "hi"}], {}),
        "role is a number": ([{"role": 5, "content": "hi"}], {}),
        "role missing": ([{"content": "hi"}], {}),
        "content missing": ([{"role": "user"}], {}),
        "content a number": ([{"role": "user", "content": 5}], {}),
        "content an object": ([{"role": "user", "content": {"text": "x"}}], {}),
        "part without type": (user([{"text": "x"}]), {}),
        "part type a number": (user([{"type": 5, "text": "x"}]), {}),
        "unknown part type": (user([{"type": "bogus"}]), {}),
        "text part without text": (user([{"type": "text"}]), {}),
        "text part with number": (user([{"type": "text", "text": 5}]), {}),
        "text part with list": (user([{"type": "text", "text": ["a"]}]), {}),
        "nested content lists": (user([[["nested"]]]), {}),
        "null part": (user([None]), {}),
        "client-sent image part": (user([{"type": "image"}]), {}),
        "tool_calls key": ([{"role": "assistant", "content": "x", "tool_calls": []}], {}),
        "continue_final_message after user": (user("hi"), {"continue_final_message": True,
                                                            "add_generation_prompt": False}),
        "generation prompt and continue": (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
            {"continue_final_message": True, "add_generation_prompt": True}),
        "chat_template_kwargs sets messages": (user("hi"), {"chat_template_kwargs": {
            "messages": []}}),
    }
    return [Case("messages", name, CHAT, dumps(b.chat(messages=msgs, **extra)))
            for name, (msgs, extra) in table.items()]


TEMPLATES = {
    "division by zero": "{{ 1/0 }}",
    "4e8-iteration loop": "{% for i in range(20000) %}{% for j in range(20000) %}"
                          "{% endfor %}{% endfor %}x",
    "range of 4e8": "{% for i in range(400000000) %}x{% endfor %}",
    "8 MB output": "{% for i in range(80000) %}{{ 'hello world ' * 9 }}{% endfor %}",
    "syntax error": "{% for %}",
    "unclosed block": "{% if true %}x",
    "raise_exception": "{{ raise_exception('boom') }}",
    "undefined call": "{{ nothing.here() }}",
    "recursive macro": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "sandbox escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "empty output": "{% if false %}x{% endif %}",
    "not a string": None,
}


def request_templates(b: Bodies, trusted: bool) -> list[Case]:
    """Refused by default; with --trust-request-chat-template bounded, each failure a 400."""
    cases = []
    names = TEMPLATES if trusted else {k: TEMPLATES[k] for k in (
        "division by zero", "4e8-iteration loop", "empty output")}
    for name, template in names.items():
        tpl: Any = template if template is not None else ["not", "a", "string"]
        cases.append(Case("chat_template", f"chat {name}", CHAT,
                          dumps(b.chat(chat_template=tpl)), max_seconds=20))
    for name in ("division by zero", "4e8-iteration loop"):
        cases.append(Case("chat_template", f"tokenize {name}", TOKENIZE,
                          dumps({"model": b.ctx.model, "messages": user("hi"),
                                 "chat_template": TEMPLATES[name]}), max_seconds=20))
    if not trusted:  # even a harmless template is refused without the flag
        cases.append(Case("chat_template", "benign template refused", CHAT,
                          dumps(b.chat(chat_template="{{ messages[0]['content'] }}")),
                          param="chat_template"))
    return cases


def special_tokens(b: Bodies) -> list[Case]:
    """Image placeholders typed as text next to real images: the prompt's placeholders must
    match the images. (Placeholders with no image at all run as text, as in vLLM.)"""
    img = image_part(data_url(png_bytes()))
    return [
        Case("special_tokens", "<image> in text plus one image", CHAT,
             b.media(img, {"type": "text", "text": "<image>"})),
        Case("special_tokens", "600 <image> in text plus one image", CHAT,
             b.media(img, {"type": "text", "text": "<image>" * 600})),
        Case("special_tokens", "<image> in an earlier message plus one image", CHAT,
             dumps(b.chat(messages=[{"role": "user", "content": "see <image>"},
                                    {"role": "assistant", "content": "ok"},
                                    {"role": "user", "content": [img, "?"]}]))),
        Case("special_tokens", "<image> in the system message plus one image", CHAT,
             dumps(b.chat(messages=[{"role": "system", "content": "<image>"},
                                    {"role": "user", "content": [img, "?"]}]))),
    ]

