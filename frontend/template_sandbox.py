"""Request-supplied chat templates, rendered in a small pool of sandboxed worker processes.

A request's template is untrusted code: it runs in jinja2's ImmutableSandboxedEnvironment, in a
separate process (so a spinning template never holds the GIL or a tokenizer thread), with a
wall-clock bound (the worker is killed and respawned), an output-size bound and an address-space
bound. Parent and worker speak one JSON object per line over pipes; nothing is pickled.

The worker builds what transformers' `apply_chat_template` gives a template (trim/lstrip blocks,
loopcontrols, `{% generation %}`, `raise_exception`, `strftime_now`, a non-escaping `tojson`),
converts the messages to the template's content format and handles `continue_final_message`
the way transformers does; the parent tokenizes the prompt.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from frontend.errors import RequestError

log = logging.getLogger(__name__)

_ROOT = str(Path(__file__).resolve().parents[1])  # the folder holding the `frontend` package
# -I: no user site, no PYTHON* variables, no script folder on sys.path.
_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); " \
         "from frontend.template_sandbox import worker_main; worker_main()"
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for the end of the final text
_PARAMS = ("chat_template", "messages", "continue_final_message")


# -- the environment (shared with frontend.chat, which parses templates with it) --------------

class GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (an assistant-mask marker): here it
    only renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[Any]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class TemplateRaised(jinja2.TemplateError):
    """raise_exception() in a template: its message is for the user."""


def _raise_exception(message: Any) -> None:
    raise TemplateRaised(str(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping, json.dumps' options
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def sandbox_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


# -- the worker process -----------------------------------------------------------------------

def worker_main() -> None:
    """Entry point of a worker: argv is [root, parent pid, address-space bytes]."""
    import resource

    from frontend.chat import detect_content_format, to_content_format

    parent = int(sys.argv[2])
    limit = int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def watch_parent() -> None:
        # Die with the parent even mid-render (stdin EOF is noticed only between requests).
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    renderer = _WorkerRenderer(detect_content_format, to_content_format)
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        try:
            reply = renderer.serve(json.loads(line))
        except MemoryError:
            reply = {"error": "the chat template used too much memory", "param": "chat_template",
                     "fatal": True}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()
        if reply.get("fatal"):
            return  # the parent respawns a clean worker


class _WorkerRenderer:
    def __init__(self, detect: Callable[[str], str],
                 convert: Callable[[Any, str, dict[str, str]], list[dict[str, Any]]]) -> None:
        self.detect = detect
        self.convert = convert
        self.env = sandbox_environment()
        self.compiled: OrderedDict[str, jinja2.Template] = OrderedDict()

    def template(self, text: str) -> jinja2.Template:
        if text in self.compiled:
            self.compiled.move_to_end(text)
            return self.compiled[text]
        self.compiled[text] = compiled = self.env.from_string(text)
        if len(self.compiled) > 16:
            self.compiled.popitem(last=False)
        return compiled

    def serve(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            template = self.template(req["template"])
            fmt = req["content_format"]
            if fmt == "auto":
                fmt = self.detect(req["template"])
            messages = self.convert(req["messages"], fmt, req["placeholders"])
            final = _mark_final_message(messages) if req["continue_final_message"] else None
            prompt = _generate(template, req["max_chars"], messages=messages, tools=None,
                               documents=None, add_generation_prompt=req["add_generation_prompt"],
                               **req["variables"])
            if final is not None:
                prompt = _cut_at_final_message(prompt, final)
            return {"prompt": prompt}
        except RequestError as e:
            return {"error": e.message, "param": e.param}
        except jinja2.TemplateSyntaxError as e:
            return {"error": f"chat template syntax error at line {e.lineno}: {_short(e)}",
                    "param": "chat_template"}
        except TemplateRaised as e:
            return {"error": f"chat template error: {_short(e)}", "param": "messages"}
        except jinja2.TemplateError as e:  # undefined names, sandbox refusals
            return {"error": f"chat template error{_where(e)}: {_short(e)}",
                    "param": "chat_template"}
        except MemoryError:
            raise
        except Exception as e:  # the template's own arithmetic, recursion, types: name the kind
            return {"error": f"chat template error{_where(e)}: {type(e).__name__}",
                    "param": "chat_template"}


def _generate(template: jinja2.Template, max_chars: int, **variables: Any) -> str:
    pieces, n = [], 0
    for piece in template.generate(**variables):
        n += len(piece)
        if n > max_chars:  # stop streaming: a template can print far more than it may keep
            raise RequestError(f"the chat template rendered more than {max_chars} characters",
                               "chat_template")
        pieces.append(piece)
    return "".join(pieces)


def _mark_final_message(messages: list[dict[str, Any]]) -> str:
    """Tags the end of the final message's text, as transformers does; returns that text."""
    content = messages[-1].get("content")
    if isinstance(content, str):
        messages[-1]["content"] = content + _CONTINUE_TAG
        return content
    for part in reversed(content or []):
        if isinstance(part.get("text"), str):
            text = part["text"]
            part["text"] = text + _CONTINUE_TAG
            return text
    raise RequestError("continue_final_message needs text in the final message to continue",
                       "continue_final_message")


def _cut_at_final_message(prompt: str, final: str) -> str:
    if final.strip() not in prompt or _CONTINUE_TAG.strip() not in prompt:
        raise RequestError("continue_final_message: the chat template does not render the final "
                           "message as it is", "continue_final_message")
    at = prompt.rindex(_CONTINUE_TAG.strip())
    if prompt[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return prompt[:at]
    return prompt[:at].rstrip()  # the template trimmed the message's trailing space


def _short(e: BaseException) -> str:
    lines = str(getattr(e, "message", None) or e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _where(e: BaseException) -> str:
    # jinja2 rewrites tracebacks so template frames carry the template's line numbers.
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == "<template>"]
    return f" at line {lines[-1]}" if lines else ""


# -- the parent side --------------------------------------------------------------------------

class _Worker:
    def __init__(self, memory_bytes: int, start_timeout_s: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD, _ROOT, str(os.getpid()), str(memory_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={}, close_fds=True)
        self.buf = b""
        ready = self.read_line(time.monotonic() + start_timeout_s, 1024)
        if ready != b'{"ready": true}':
            self.kill()
            raise RuntimeError("the chat template worker did not start")

    def call(self, line: bytes, deadline: float, max_bytes: int) -> bytes | None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()
        return self.read_line(deadline, max_bytes)

    def read_line(self, deadline: float, max_bytes: int) -> bytes | None:
        """One reply line; None on timeout, a dead worker or a reply over max_bytes."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or len(self.buf) > max_bytes or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def _kill_all(workers: set[_Worker]) -> None:
    for w in list(workers):
        w.kill()
    workers.clear()


class TemplateSandbox:
    """A pool of `workers` persistent processes rendering untrusted chat templates.

    `render` blocks its (worker) thread on a pipe with the GIL released; at most `workers`
    renders run at once, others wait for a free worker up to `wait_s` (default `timeout_s`),
    then answer 429."""

    def __init__(self, workers: int = 2, *, timeout_s: float = 2.0, wait_s: float | None = None,
                 max_chars: int = 1_000_000, memory_bytes: int = 1 << 30,
                 start_timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        self.wait_s = timeout_s if wait_s is None else wait_s
        self.max_chars = max_chars
        self.memory_bytes = memory_bytes
        self.start_timeout_s = start_timeout_s
        # LIFO: a warm worker is reused before an unstarted slot spawns another.
        self._free: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
        for _ in range(workers):
            self._free.put(None)  # spawned on first use
        self._live: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        # Kills the workers if the sandbox is dropped or the interpreter exits without close().
        self._finalizer = weakref.finalize(self, _kill_all, self._live)

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._live]

    def render(self, request: dict[str, Any]) -> str:
        """The prompt for one request: {template, messages, content_format, placeholders,
        variables, add_generation_prompt, continue_final_message, max_chars}. Every failure is a
        RequestError."""
        max_chars = min(self.max_chars, request.get("max_chars") or self.max_chars)
        line = json.dumps({**request, "max_chars": max_chars}).encode()
        try:
            worker = self._free.get(timeout=self.wait_s)
        except queue.Empty:
            raise RequestError("too many requests with their own chat_template are rendering; "
                               "retry later", "chat_template", status=429) from None
        try:
            if worker is not None and worker.proc.poll() is not None:
                self._retire(worker)  # died while idle: not this request's doing
                worker = None
            worker, out = self._exchange(worker or self._spawn(), line, max_chars)
        finally:
            self._free.put(worker)
        if out is None:
            raise RequestError(f"the chat template did not finish within {self.timeout_s:g} s "
                               "and its limits", "chat_template")
        if "error" in out:
            param = str(out.get("param"))
            if param not in _PARAMS and not param.startswith("messages["):
                param = "chat_template"
            raise RequestError(str(out["error"])[:300], param)
        prompt = out.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError("the chat template did not render to a string", "chat_template")
        return prompt

    def _exchange(self, worker: _Worker, line: bytes,
                  max_chars: int) -> tuple[_Worker | None, dict[str, Any] | None]:
        """(the worker if it may serve again, its reply); a reply of None: it was killed."""
        try:
            # 8 bytes a character covers JSON's \uXXXX escapes of any rendered text.
            reply = worker.call(line, time.monotonic() + self.timeout_s, 8 * max_chars + 4096)
            out = json.loads(reply) if reply is not None else None
        except (OSError, ValueError):  # a dead worker's pipe, a garbled reply
            out = None
        if not isinstance(out, dict):
            self._retire(worker)
            return None, None
        if out.get("fatal"):
            self._retire(worker)
            return None, out
        return worker, out

    def _spawn(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("the template sandbox is closed")
        worker = _Worker(self.memory_bytes, self.start_timeout_s)
        with self._lock:
            self._live.add(worker)
            if self._closed:  # close() ran while this one started
                self._live.discard(worker)
                worker.kill()
                raise RuntimeError("the template sandbox is closed")
        return worker

    def _retire(self, worker: _Worker) -> None:
        log.info("chat template worker %d stopped (timeout, oversize or crash)", worker.proc.pid)
        with self._lock:
            self._live.discard(worker)
        worker.kill()

    def close(self) -> None:
        """Kills every worker (also those busy rendering); later renders fail."""
        with self._lock:
            self._closed = True
            workers = set(self._live)
            self._live.clear()
        _kill_all(workers)
