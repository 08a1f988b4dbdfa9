"""Request-supplied chat templates: refused unless trusted; then rendered in sandboxed worker
processes, bounded in time, output and memory, every failure a 400 naming the field."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from frontend.chat import ChatRenderer
from frontend.errors import RequestError
from frontend.random_model import CHATML_TEMPLATE, IMAGE_TOKEN, build_tokenizer
from frontend.template_sandbox import TemplateSandbox

USER = [{"role": "user", "content": "Hello"}]
SPIN = "{% for i in range(20000) %}{% for j in range(20000) %}{% endfor %}{% endfor %}"  # 4e8
LLAVA_LIKE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n"
    "{% endfor %}{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ c['text'] + ' ' }}{% endgeneration %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
FEATURES = (  # what transformers' templates lean on
    "{%- for m in messages -%}\n  {%- if m['role'] == 'system' %}{% continue %}{% endif -%}\n"
    "  [{{ m['role'] }}] {{ m['content'] | tojson }}\n{%- endfor %}"
    "{{ eos_token }}{{ extra | tojson }}{{ strftime_now('%Y') | length }}"
    "{% if add_generation_prompt %}<go>{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder, chat_template=CHATML_TEMPLATE)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def sandbox():
    box = TemplateSandbox(workers=2, timeout_s=1.0)
    yield box
    box.close()


@pytest.fixture(scope="module")
def trusted(tok, sandbox):
    return ChatRenderer(tok, trust_request_template=True, sandbox=sandbox,
                        media_placeholders={"image": IMAGE_TOKEN})


def error_of(fn, *args, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    return info.value


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_refused_unless_trusted(tok):
    r = ChatRenderer(tok)
    e = error_of(r.render, USER, chat_template="{{ 'hi' }}")
    assert e.status == 400 and e.param == "chat_template"
    assert "--trust-request-chat-template" in e.message
    assert r.render(USER).prompt.startswith("<|im_start|>user")  # its own template still serves


@pytest.mark.parametrize("template, kwargs", [
    (CHATML_TEMPLATE, {}),
    (LLAVA_LIKE, {}),
    (FEATURES, {"chat_template_kwargs": {"extra": {"é": [1, None]}}}),
    (CHATML_TEMPLATE, {"continue_final_message": True}),
])
def test_sandbox_matches_transformers(tok, trusted, template, kwargs):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A cat "}]
    if not kwargs.get("continue_final_message"):
        msgs.append({"role": "user", "content": "Sure?"})
    in_process = ChatRenderer(tok, template, media_placeholders={"image": IMAGE_TOKEN})
    expected = in_process.render(msgs, **kwargs)
    got = trusted.render(msgs, chat_template=template, **kwargs)
    assert got == expected


def test_sandbox_string_mode(tok, sandbox):
    r = ChatRenderer(tok, trust_request_template=True, sandbox=sandbox, content_format="string",
                     media_placeholders={"image": IMAGE_TOKEN})
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    image_text = [{"type": "image"}, {"type": "text", "text": "What?"}, {"type": "image"}]
    got = r.render([{"role": "user", "content": image_text}], chat_template=template)
    assert got.prompt == "user: <image>\n<image>\nWhat?\n"
    image_text[1]["text"] = "<image>" * 3
    e = error_of(r.render, [{"role": "user", "content": image_text}], chat_template=template)
    assert e.param == "messages[0].content"


@pytest.mark.parametrize("template, param, words", [
    ("{{ 1/0 }}", "chat_template", "ZeroDivisionError"),
    ("{% for m in messages %}\n{{ m.content + 1 }}{% endfor %}", "chat_template", "line 2"),
    ("{% if %}", "chat_template", "syntax error"),
    ("{{ raise_exception('Conversation roles must alternate') }}", "messages",
     "Conversation roles must alternate"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "chat_template",
     "more than 1000000 characters"),
    ("{{ 'x' * 3000000000 }}", "chat_template", "memory"),
    ("{{ nothing.here }}", "chat_template", "undefined"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "chat_template", "RecursionError"),
    (SPIN, "chat_template", "did not finish within 1 s"),
])
def test_failures_are_400s(trusted, template, param, words):
    started = time.monotonic()
    e = error_of(trusted.render, USER, chat_template=template)
    assert e.status == 400 and e.param == param and words in e.message
    assert "Traceback" not in e.message and len(e.message) <= 300
    assert time.monotonic() - started < 10
    assert trusted.render(USER, chat_template="{{ 'ok' }}").prompt == "ok"  # and it recovers


def test_timeout_replaces_the_worker(trusted, sandbox):
    trusted.render(USER, chat_template="{{ 'warm' }}")
    before = set(sandbox.pids)
    error_of(trusted.render, USER, chat_template=SPIN)
    assert not any(alive(p) for p in before - set(sandbox.pids))
    assert trusted.render(USER, chat_template="{{ 'again' }}").prompt == "again"


def test_server_keeps_serving_while_a_template_spins(tok, trusted):
    trusted.render(USER, chat_template="{{ 'warm' }}")
    failed: list[RequestError] = []

    def hostile() -> None:
        try:
            trusted.render(USER, chat_template=SPIN)
        except RequestError as e:
            failed.append(e)

    spinner = threading.Thread(target=hostile)
    spinner.start()
    time.sleep(0.2)  # the worker is spinning now
    started = time.monotonic()
    for _ in range(5):
        assert trusted.render(USER).prompt.endswith("<|im_start|>assistant\n")
    elapsed = time.monotonic() - started
    assert spinner.is_alive() and elapsed < 0.5
    spinner.join()
    assert failed and failed[0].param == "chat_template"


def test_concurrency_is_bounded(tok):
    box = TemplateSandbox(workers=1, timeout_s=1.5, wait_s=0.5)
    r = ChatRenderer(tok, trust_request_template=True, sandbox=box)
    r.render(USER, chat_template="{{ 'warm' }}")
    statuses: list[int] = []

    def render(template: str) -> None:
        statuses.append(error_of(r.render, USER, chat_template=template).status)

    threads = [threading.Thread(target=render, args=(t,)) for t in (SPIN, "a", "b")]
    try:
        for t in threads:  # the first holds the only worker; the others wait 0.5 s, then 429
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join()
        assert sorted(statuses) == [400, 429, 429]
        assert r.render(USER, chat_template="{{ 'free' }}").prompt == "free"
    finally:
        box.close()


def test_max_prompt_chars_bounds_the_sandbox(tok, sandbox):
    r = ChatRenderer(tok, trust_request_template=True, sandbox=sandbox, max_prompt_chars=50)
    e = error_of(r.render, USER, chat_template="{{ 'x' * 51 }}")
    assert e.param == "messages" and "limit of 50" in e.message
    e = error_of(r.render, USER, chat_template="{% for i in range(1000) %}xxxxx{% endfor %}")
    assert e.param == "chat_template" and "more than 51 characters" in e.message


def test_close_leaves_no_worker(tok):
    r = ChatRenderer(tok, trust_request_template=True)
    assert r.render(USER, chat_template="{{ 'one' }}").prompt == "one"
    pids = r._sandbox.pids if r._sandbox else []
    assert pids and all(alive(p) for p in pids)
    r.close()
    assert not any(alive(p) for p in pids)
    with pytest.raises(RuntimeError):
        r.render(USER, chat_template="{{ 'two' }}")


def test_workers_die_with_their_parent():
    code = ("import os, sys; from frontend.template_sandbox import TemplateSandbox\n"
            "box = TemplateSandbox(workers=1)\n"
            "box.render({'template': 'x', 'messages': [], 'content_format': 'string',"
            " 'placeholders': {}, 'variables': {}, 'add_generation_prompt': False,"
            " 'continue_final_message': False})\n"
            "print(box.pids[0], flush=True); os._exit(0)")
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=root, env={**os.environ, "PYTHONPATH": root})
    pid = int(out.stdout)
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_offline_templates_run_in_process(tok):
    r = ChatRenderer(tok, trust_request_template=True, sandbox_request_templates=False)
    assert r.render(USER, chat_template="{{ messages[0]['content'] }}!").prompt == "Hello!"
    assert error_of(r.render, USER, chat_template="{% if %}").param == "chat_template"
    assert error_of(r.render, USER, chat_template="{{ 1/0 }}").param == "messages"
    assert r._sandbox is None  # no worker process was started
    r.close()
