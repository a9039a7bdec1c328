"""An OpenAI-compatible HTTP server for one loaded model, on the standard library's ``ThreadingHTTPServer``.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions`` and ``POST /v1/chat/completions``,
the last two also as server-sent events (``"stream": true``). Errors come back in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for a body that is not a JSON object or has fields of
the wrong type, 401 for a wrong API key, 404 for an unknown path or model, 405 for a wrong method, 411/413 for a
missing or oversized body, 422 for values that are well-formed but refused (nonsense sampling values, a prompt
longer than allowed, ``max_tokens`` above the limit, features this server does not have), 503 when the queue
is full.

Concurrency: each request runs in its own thread; the model's lock lets one generation run at a time (a
llama.cpp context and our ONNX buffers hold one sequence), and at most ``max_queue`` more requests wait for it.
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edgedistill.errors import EdgeDistillError
from edgedistill.runtime.model import Completion, LanguageModel, TextStream
from edgedistill.runtime.sampling import SamplingParams

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# OpenAI's defaults for fields a request leaves out (API reference: completions max_tokens 16, temperature 1, top_p 1).
OPENAI_COMPLETION_MAX_TOKENS = 16
OPENAI_TEMPERATURE = 1.0
OPENAI_MAX_STOP = 4  # OpenAI accepts up to 4 stop sequences
# Seconds a connection may sit idle (or trickle a body) before the server drops it.
SOCKET_TIMEOUT = 30.0


@dataclass(frozen=True)
class ServerLimits:
    """What a request may ask for.

    Attributes:
        max_prompt_tokens: the longest prompt in tokens (None: the model's context minus one).
        max_tokens: the largest ``max_tokens`` a request may ask for; also the default for chat requests.
        max_body_bytes: the largest request body.
        max_queue: requests that may wait while one generates; more get 503.
    """

    max_prompt_tokens: int | None = None
    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    max_queue: int = 8

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EdgeDistillError(f"server: {name} must be an integer >= 1, got {value!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise EdgeDistillError(f"server: max_queue must be an integer >= 0, got {self.max_queue!r}")
        if self.max_prompt_tokens is not None and (
            isinstance(self.max_prompt_tokens, bool)
            or not isinstance(self.max_prompt_tokens, int)
            or self.max_prompt_tokens < 1
        ):
            raise EdgeDistillError(f"server: max_prompt_tokens must be an integer >= 1, got {self.max_prompt_tokens!r}")


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == HTTPStatus.UNAUTHORIZED:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------- request validation


def _field(body: Mapping[str, Any], name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """``body[name]`` if present and not null, checked to be one of ``kinds`` (bool is never a number)."""
    value = body.get(name)
    if value is None:
        return default
    numeric = any(kind in (int, float) for kind in kinds)
    if not isinstance(value, kinds) or (numeric and isinstance(value, bool) and bool not in kinds):
        names = " or ".join("number" if k is float else "integer" if k is int else k.__name__ for k in kinds)
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'{name}' must be {names}, got {json.dumps(value)[:80]}", name)
    return value


def _stop_list(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError(HTTPStatus.BAD_REQUEST, "'stop' must be a string or a list of strings", "stop")
    if len(stop) > OPENAI_MAX_STOP:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f"'stop' holds at most {OPENAI_MAX_STOP} strings", "stop")
    return tuple(stop)


def sampling_from_request(body: Mapping[str, Any], default_max_tokens: int, limits: ServerLimits) -> SamplingParams:
    """The sampling settings of a completions or chat request, with OpenAI's defaults and our limits.

    Raises:
        RequestError: 400 for a wrong type, 422 for a refused value.
    """
    max_tokens = _field(body, "max_tokens", (int,))
    if max_tokens is None:
        max_tokens = _field(body, "max_completion_tokens", (int,), default_max_tokens)
    if max_tokens > limits.max_tokens:
        raise RequestError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            f"'max_tokens' is {max_tokens}; this server allows at most {limits.max_tokens}",
            "max_tokens",
        )
    n = _field(body, "n", (int,), 1)
    if n != 1:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, "only n = 1 is supported", "n")
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
        value = body.get(name)
        if value not in (None, False, 0, [], {}):
            raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f"'{name}' is not supported by this server", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, (int, float), 0) != 0:
            raise RequestError(
                HTTPStatus.UNPROCESSABLE_ENTITY, f"'{name}' is not supported; use 'repetition_penalty'", name
            )
    options = {
        "max_tokens": max_tokens,
        "temperature": _field(body, "temperature", (int, float), OPENAI_TEMPERATURE),
        "top_p": _field(body, "top_p", (int, float), 1.0),
        "top_k": _field(body, "top_k", (int,), 0),
        "repetition_penalty": _field(body, "repetition_penalty", (int, float), 1.0),
        "seed": _field(body, "seed", (int,)),
        "stop": _stop_list(body),
    }
    try:
        return SamplingParams(**options)
    except EdgeDistillError as err:
        message = str(err).removeprefix("sampling: ")
        param = message.split(" ", 1)[0]
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, message, param if param in options else None) from None


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """The request's messages as ``{"role", "content"}`` strings; text parts of a content list are joined.

    Raises:
        RequestError: 400 when ``messages`` is missing or malformed.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(HTTPStatus.BAD_REQUEST, "'messages' must be a non-empty list", "messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"messages[{index}] must be an object", "messages")
        role, content = message.get("role"), message.get("content")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(
                        HTTPStatus.UNPROCESSABLE_ENTITY,
                        f"messages[{index}].content: only text parts are supported",
                        "messages",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(role, str) or not isinstance(content, str):
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"messages[{index}] needs a string 'role' and a string 'content'", "messages"
            )
        out.append({"role": role, "content": content})
    return out


# --------------------------------------------------------------------------------------------------- the server


class ModelServer(ThreadingHTTPServer):
    """A threading HTTP server bound to one model.

    Args:
        model: the loaded model.
        host: the address to bind (127.0.0.1 by default: reachable from this machine only).
        port: the port (0: any free one; see :attr:`port`).
        limits: what a request may ask for.
        model_id: the name clients use for the model (default: the file or directory name).
        api_key: when set, requests must send ``Authorization: Bearer <api_key>``.
    """

    daemon_threads = True
    allow_reuse_address = True
    verbose = False  # log each request to stderr

    def __init__(
        self,
        model: LanguageModel,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        limits: ServerLimits | None = None,
        model_id: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.model = model
        self.limits = limits or ServerLimits()
        self.model_id = model_id or default_model_id(model)
        self.api_key = api_key
        self.created = int(time.time())
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens or model.context - 1, model.context - 1)
        # One running plus max_queue waiting: acquired without blocking, so an overflow is refused at once.
        self._slots = threading.BoundedSemaphore(self.limits.max_queue + 1)
        self._active = 0
        self._active_lock = threading.Lock()
        try:
            super().__init__((host, port), _Handler)
        except OSError as err:
            raise EdgeDistillError(f"serve: cannot listen on {host}:{port} ({err.strerror or err})") from None

    @property
    def active_requests(self) -> int:
        """Generation requests being served or waiting for the model."""
        return self._active

    def _enter(self) -> bool:
        if not self._slots.acquire(blocking=False):
            return False
        with self._active_lock:
            self._active += 1
        return True

    def _leave(self) -> None:
        with self._active_lock:
            self._active -= 1
        self._slots.release()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{host if ':' not in host else f'[{host}]'}:{self.port}"

    def model_object(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edgedistill"}


def default_model_id(model: LanguageModel) -> str:
    """The model's file name without suffix, or its export directory's name for ``model.onnx``."""
    path = Path(model.info.path)
    return path.parent.name if path.name == "model.onnx" else path.stem


class _Handler(BaseHTTPRequestHandler):
    """One HTTP connection; the OpenAI routes."""

    server: ModelServer
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT
    error_content_type = "application/json"

    # ---------------------------------------------------------------------------------------------- plumbing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        if self.server.verbose:
            super().log_message(format, *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The stdlib's own errors (bad request line, headers too long) in OpenAI's shape too.
        self.close_connection = True
        self._send_json(code, RequestError(code, message or HTTPStatus(code).phrase).body())

    def _send_json(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        self._id = secrets.token_hex(12)
        try:
            self._check_key()
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/v1/models" or path.startswith("/v1/models/"):
                if method != "GET":
                    raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} {path}: use GET")
                self._models(path)
            elif path in ("/v1/completions", "/v1/chat/completions"):
                if method != "POST":
                    raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} {path}: use POST")
                body = self._read_body()
                if path == "/v1/completions":
                    self._completions(body)
                else:
                    self._chat(body)
            elif path in ("", "/health"):
                server = self.server
                self._send_json(
                    HTTPStatus.OK, {"status": "ok", "model": server.model_id, "active": server.active_requests}
                )
            else:
                self.close_connection = True
                raise RequestError(HTTPStatus.NOT_FOUND, f"no route {method} {path or '/'}")
        except RequestError as err:
            self._send_json(err.status, err.body())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client left or stalled
            self.close_connection = True
        except Exception as err:  # a bug must answer 500 and leave the server running
            self.close_connection = True
            print(f"edgedistill serve: internal error: {type(err).__name__}: {err}", file=sys.stderr)
            try:
                self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, RequestError(500, "internal server error").body())
            except OSError:
                pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def _check_key(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        sent = self.headers.get("Authorization", "")
        if not secrets.compare_digest(sent.encode(), f"Bearer {key}".encode()):
            raise RequestError(HTTPStatus.UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer ...)")

    def _read_body(self) -> dict[str, Any]:
        length_header = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length_header is None:
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length header and a JSON body")
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length_header!r}")
        if length > self.server.limits.max_body_bytes:
            self.close_connection = True  # the body stays unread
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body has {length} bytes; this server accepts at most {self.server.limits.max_body_bytes}",
            )
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return body

    def _check_model(self, body: Mapping[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str):
            raise RequestError(HTTPStatus.BAD_REQUEST, "'model' must be a string", "model")
        if model != self.server.model_id:
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                f"the model '{model}' does not exist; this server serves '{self.server.model_id}'",
                "model",
                "model_not_found",
            )

    def _check_prompt(self, ids: list[int]) -> None:
        limit = self.server.max_prompt_tokens
        if not ids:
            raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, "the prompt is empty (no tokens)", "prompt")
        if len(ids) > limit:
            raise RequestError(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                f"the prompt has {len(ids)} tokens; this server accepts at most {limit}",
                "prompt",
                "context_length_exceeded",
            )

    # ------------------------------------------------------------------------------------------------ routes

    def _models(self, path: str) -> None:
        server = self.server
        if path == "/v1/models":
            self._send_json(HTTPStatus.OK, {"object": "list", "data": [server.model_object()]})
            return
        name = path[len("/v1/models/") :]
        if name != server.model_id:
            raise RequestError(HTTPStatus.NOT_FOUND, f"the model '{name}' does not exist", None, "model_not_found")
        self._send_json(HTTPStatus.OK, server.model_object())

    def _completions(self, body: dict[str, Any]) -> None:
        self._check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.server.model.tokenize(prompt, add_special=True)
        elif isinstance(prompt, list) and prompt and all(type(i) is int for i in prompt):
            ids = list(prompt)  # token ids, as OpenAI's API allows
            vocab = self.server.model.info.vocab_size
            if not all(0 <= i < vocab for i in ids):
                raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f"token ids must lie in [0, {vocab})", "prompt")
        else:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, "'prompt' must be a string (or one string in a list, or token ids)", "prompt"
            )
        params = sampling_from_request(body, OPENAI_COMPLETION_MAX_TOKENS, self.server.limits)
        stream = _field(body, "stream", (bool,), False)
        self._check_prompt(ids)
        self._generate(ids, params, stream, chat=False, include_usage=_include_usage(body))

    def _chat(self, body: dict[str, Any]) -> None:
        self._check_model(body)
        messages = chat_messages(body)
        params = sampling_from_request(body, self.server.limits.max_tokens, self.server.limits)
        stream = _field(body, "stream", (bool,), False)
        try:
            prompt = self.server.model.render_chat(messages)
        except EdgeDistillError as err:
            raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, str(err), "messages") from None
        ids = self.server.model.tokenize(prompt, add_special=False)
        self._check_prompt(ids)
        self._generate(ids, params, stream, chat=True, include_usage=_include_usage(body))

    def _generate(self, ids: list[int], params: SamplingParams, stream: bool, chat: bool, include_usage: bool) -> None:
        server = self.server
        if not server._enter():
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is busy; try again shortly")
        try:
            try:
                pieces = server.model.stream_ids(ids, params)
            except EdgeDistillError as err:
                raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, str(err), "prompt") from None
            with pieces:
                if stream:
                    self._send_stream(pieces, chat, include_usage)
                else:
                    try:
                        text = "".join(pieces)
                    except EdgeDistillError as err:  # the model failed while running (a broken file)
                        raise RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, str(err)) from None
                    self._send_json(HTTPStatus.OK, self._result(pieces.completion, text, chat))
        finally:
            server._leave()

    def _envelope(self, chat: bool, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{self._id}",
            "object": kind,
            "created": int(time.time()),
            "model": self.server.model_id,
            "system_fingerprint": None,
        }

    def _result(self, completion: Completion, text: str, chat: bool) -> dict[str, Any]:
        payload = self._envelope(chat, chunk=False)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = completion.finish_reason
        payload["choices"] = [choice]
        payload["usage"] = _usage(completion)
        return payload

    def _send_stream(self, pieces: TextStream, chat: bool, include_usage: bool) -> None:
        # Pull the first piece before sending 200, so that an error in the prompt's evaluation is still an HTTP error.
        first = _prefetch(pieces)
        self.close_connection = True  # the event stream ends when the connection closes
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

        def event(payload: Any) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            payload = self._envelope(chat, chunk=True)
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                payload["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            else:
                payload["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
            return payload

        if chat:
            event(chunk("", None, role=True))
        for piece in first:
            event(chunk(piece, None))
        completion = pieces.completion
        event(chunk(None if chat else "", completion.finish_reason))
        if include_usage:
            payload = self._envelope(chat, chunk=True)
            payload["choices"] = []
            payload["usage"] = _usage(completion)
            event(payload)
        event("[DONE]")


def _prefetch(pieces: TextStream) -> Iterator[str]:
    """The stream with its first piece already generated (errors surface here, before the response starts)."""
    try:
        first = next(pieces)
    except StopIteration:
        return iter(())
    except EdgeDistillError as err:  # the model failed while running (a broken file)
        raise RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, str(err)) from None

    def chain() -> Iterator[str]:
        yield first
        yield from pieces

    return chain()


def _usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def serve_forever(server: ModelServer) -> None:
    """Serve until Ctrl-C (SIGINT) or SIGTERM, then close the socket.

    In the main thread the two signals are handled, not left to raise KeyboardInterrupt: an exception raised at an
    arbitrary point of the accept loop (inside a lock, or while a handler thread starts) could leave the process
    unable to exit. The handler asks the loop to stop from a helper thread (``shutdown`` waits for the loop), and
    the loop notices within its poll interval.
    """
    import signal

    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, name="edgedistill-shutdown", daemon=True).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        server.server_close()
