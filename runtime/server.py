"""The OpenAI-compatible application of ``edgedistill serve``: routes, request validation, generation, streaming.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions`` and ``POST /v1/chat/completions``,
the last two also as server-sent events (``"stream": true``). Errors come back in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for a body that is not a JSON object of valid Unicode text
or has fields of the wrong type, 401 for a wrong API key, 403 for a ``Host`` header this server does not answer
(DNS rebinding), 404 for an unknown path or model, 405 for a wrong method, 408 for a request that did not arrive
within its deadline, 411/413 for a missing or oversized body, 415 for a body that is not ``application/json``,
422 for values that are well-formed but refused (nonsense sampling values, a prompt longer than allowed,
``max_tokens`` above the limit, features this server does not have), 503 (with ``Retry-After``) when the queue or
the connection cap is full. Bad input never gets a 5xx; a real internal error gets 500 and one line on stderr.

:class:`ModelServer` wires one model to ``edgedistill.runtime.http_transport``, which holds the socket-level concerns
(one thread per connection up to ``max_connections``, more answered 503 by the accept loop; the whole-request
deadline ``request_timeout_s``, else 408; closes that never reset a reply; ``Host`` parsing; one-line logs). Here,
the model's lock lets one generation run at a time (a llama.cpp context and our ONNX buffers hold one sequence), and
at most ``max_queue`` more requests wait for it.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from edgedistill.errors import EdgeDistillError
from edgedistill.runtime.http_transport import (
    ANY_HOST,
    CLIENT_GONE,
    RequestTimeout,
    TransportHandler,
    TransportServer,
    allowed_hosts_for,
    client_label,
    host_name,
    overload_reply,
    serve_forever,
)
from edgedistill.runtime.model import Completion, LanguageModel, TextStream
from edgedistill.runtime.sampling import SamplingParams

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ModelServer",
    "RequestError",
    "ServerLimits",
    "allowed_hosts_for",
    "chat_messages",
    "default_model_id",
    "host_name",
    "parse_json_object",
    "resolve_api_key",
    "sampling_from_request",
    "serve_forever",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# OpenAI's defaults for fields a request leaves out (API reference: completions max_tokens 16, temperature 1, top_p 1).
OPENAI_COMPLETION_MAX_TOKENS = 16
OPENAI_TEMPERATURE = 1.0
OPENAI_MAX_STOP = 4  # OpenAI accepts up to 4 stop sequences
# Request bodies: OpenAI's requests nest 5 levels deep; refusing deeper bodies keeps every walk over them cheap.
MAX_JSON_DEPTH = 32
# Sampling values the server refuses although the library accepts them: below the smallest positive temperature
# (or outside the penalty range) the scaled float logits overflow to infinity for large logits, which the sampler
# would report as a broken model. No useful setting lies anywhere near these bounds.
MIN_TEMPERATURE = 1e-6
REPETITION_PENALTY_RANGE = (1e-6, 1e6)
API_KEY_ENV = "EDGEDISTILL_API_KEY"
MAX_MESSAGE_CHARS = 500  # an error message (which may quote the request) is cut here

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_DIGITS = re.compile(r"[0-9]{1,100}")


@dataclass(frozen=True)
class ServerLimits:
    """What a request may ask for.

    Attributes:
        max_prompt_tokens: the longest prompt in tokens (None: the model's context minus one).
        max_tokens: the largest ``max_tokens`` a request may ask for; also the default for chat requests.
        max_body_bytes: the largest request body.
        max_queue: requests that may wait while one generates; more get 503.
        max_connections: connections served at once, one thread each; more get 503 from the accept loop.
        request_timeout_s: seconds within which a request's line, headers and body must all have arrived (else
            408); also how long an idle keep-alive connection is kept.
        max_messages: the most chat messages one request may hold.
    """

    max_prompt_tokens: int | None = None
    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    max_queue: int = 8
    max_connections: int = 64
    request_timeout_s: float = 30.0
    max_messages: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_body_bytes", "max_connections", "max_messages"):
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
        timeout = self.request_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise EdgeDistillError(f"server: request_timeout_s must be a finite number of seconds > 0, got {timeout!r}")


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
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


def _shown(value: Any, limit: int = 80) -> str:
    """``value`` quoted for an error message: JSON with ASCII escapes (always encodable), cut at ``limit``."""
    text = json.dumps(value[: limit + 1] if isinstance(value, str) else value, ensure_ascii=True, default=repr)
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------------------------ request bodies


class _JSONValueError(ValueError):
    """A number the server refuses inside otherwise valid JSON."""


def _refuse_constant(name: str) -> Any:
    raise _JSONValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JSONValueError(f"the number {text[:40]} is out of range")
    return value


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object of valid Unicode text, nested at most ``MAX_JSON_DEPTH`` levels.

    Raises:
        RequestError: 400 for bytes that are not UTF-8, text that is not JSON, ``NaN``/``Infinity`` or numbers out
            of range, a body that is not an object, nesting too deep, or strings with lone surrogates (``"\\ud800"``
            is valid JSON but no text: it cannot be encoded, tokenized or echoed).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not valid UTF-8 (byte {err.start})") from None
    try:
        # Integers need no hook: Python's int() refuses more than 4300 digits with a ValueError, and the fields
        # refuse values out of their range.
        body = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # json.JSONDecodeError, _JSONValueError
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    _check_tree(body, text)
    return body


def _check_tree(body: dict[str, Any], text: str) -> None:
    """Depth of every container and, where the text has a surrogate escape, every string; without recursion (a deep
    body must not exhaust the stack)."""
    # Decoded UTF-8 holds no surrogates, so one can only come from a \\uD800-\\uDFFF escape (a valid pair becomes one
    # character): without such an escape in the text, no string needs a look.
    strings = _SURROGATE_ESCAPE.search(text) is not None
    stack: list[tuple[Any, str, str | None, int]] = [(body, "", None, 1)]  # value, where, top-level field, depth
    while stack:
        value, where, field, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body nests deeper than {MAX_JSON_DEPTH} levels", field)
        if isinstance(value, list):
            kinds = set(map(type, value))  # at C speed: a long list of token ids needs no loop in Python
            if not kinds & {dict, list} and not (strings and str in kinds):
                continue
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                if strings:
                    _check_text(key, f"a key in {where or 'the body'}", field)
                path, name = (f"{where}.{key}" if where else key), field or key
            else:
                path, name = f"{where}[{key}]", field
            if isinstance(item, (dict, list)):
                stack.append((item, path, name, depth + 1))
            elif strings and isinstance(item, str):
                _check_text(item, path, name)


def _check_text(text: str, where: str, field: str | None) -> None:
    found = _SURROGATE.search(text)
    if found:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"'{where[:100]}' holds a lone surrogate ({ascii(found.group())}), which is not text; send valid Unicode",
            field,
        )


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
    if 0 < options["temperature"] < MIN_TEMPERATURE:
        raise RequestError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {options['temperature']!r}",
            "temperature",
        )
    low, high = REPETITION_PENALTY_RANGE
    if not low <= options["repetition_penalty"] <= high:
        raise RequestError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            f"repetition_penalty must lie in [{low:g}, {high:g}] (1 = none), got {options['repetition_penalty']!r}",
            "repetition_penalty",
        )
    try:
        return SamplingParams(**options)
    except EdgeDistillError as err:
        message = str(err).removeprefix("sampling: ")
        param = message.split(" ", 1)[0]
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, message, param if param in options else None) from None


def chat_messages(body: Mapping[str, Any], max_messages: int | None = None) -> list[dict[str, str]]:
    """The request's messages as ``{"role", "content"}`` strings; text parts of a content list are joined.

    Raises:
        RequestError: 400 when ``messages`` is missing or malformed, 422 for more than ``max_messages``.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(HTTPStatus.BAD_REQUEST, "'messages' must be a non-empty list", "messages")
    if max_messages is not None and len(messages) > max_messages:
        raise RequestError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            f"'messages' holds {len(messages)} messages; this server accepts at most {max_messages}",
            "messages",
        )
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


# ------------------------------------------------------------------------------------------------------ API keys


def resolve_api_key(
    flag: str | None, key_file: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The API key from ``--api-key``, else ``--api-key-file``, else ``$EDGEDISTILL_API_KEY``; None when none is set.

    A key on the command line is visible to every user of the machine (``ps``); a file or the environment is not.

    Raises:
        EdgeDistillError: an empty key, a key file that is missing, unreadable or empty, or a key with control
            characters (it travels in an HTTP header).
    """
    environ = os.environ if environ is None else environ
    if flag is not None:
        key, source = flag.strip(), "--api-key"
    elif key_file is not None:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
            raise EdgeDistillError(f"--api-key-file {key_file}: cannot read the key ({reason})") from None
        source = f"--api-key-file {key_file}"
    elif API_KEY_ENV in environ:
        key, source = environ[API_KEY_ENV].strip(), f"${API_KEY_ENV}"
    else:
        return None
    if not key:
        raise EdgeDistillError(f"{source}: the API key is empty")
    if any(ord(char) < 32 or ord(char) == 127 for char in key):
        raise EdgeDistillError(f"{source}: the API key must be one line without control characters")
    return key


# --------------------------------------------------------------------------------------------------- the server


class ModelServer(TransportServer):
    """A threading HTTP server bound to one model (the connection cap, deadlines and closes: :class:`TransportServer`).

    Args:
        model: the loaded model.
        host: the address to bind (127.0.0.1 by default: reachable from this machine only).
        port: the port (0: any free one; see :attr:`port`).
        limits: what a request may ask for.
        model_id: the name clients use for the model (default: the file or directory name).
        api_key: when set, requests must send ``Authorization: Bearer <api_key>``.
        allowed_hosts: the names a request's ``Host`` header may carry (``"*"``: any), against DNS rebinding;
            :func:`allowed_hosts_for` builds the set ``edgedistill serve`` uses. None (the default for an embedded
            server) checks no Host.
    """

    def __init__(
        self,
        model: LanguageModel,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        limits: ServerLimits | None = None,
        model_id: str | None = None,
        api_key: str | None = None,
        allowed_hosts: Iterable[str] | None = None,
    ) -> None:
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise EdgeDistillError("server: api_key must be a non-empty string or None")
        self.model = model
        self.limits = limits or ServerLimits()
        self.model_id = model_id or default_model_id(model)
        self.api_key = api_key
        self.allowed_hosts = None if allowed_hosts is None else frozenset(name.lower() for name in allowed_hosts)
        self.created = int(time.time())
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens or model.context - 1, model.context - 1)
        # One running plus max_queue waiting: acquired without blocking, so an overflow is refused at once.
        self._slots = threading.BoundedSemaphore(self.limits.max_queue + 1)
        self._active = 0
        self._active_lock = threading.Lock()
        # One thread per connection, at most max_connections; the accept loop itself answers any more with 503.
        busy = RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the server has too many connections; try again shortly")
        timeout = self.limits.request_timeout_s
        super().__init__((host, port), _Handler, self.limits.max_connections, timeout, overload_reply(busy.body()))

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

    def model_object(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edgedistill"}


def default_model_id(model: LanguageModel) -> str:
    """The model's file name without suffix, or its export directory's name for ``model.onnx``."""
    path = Path(model.info.path)
    return path.parent.name if path.name == "model.onnx" else path.stem


class _Handler(TransportHandler):
    """One HTTP connection; the OpenAI routes (reading and closing: :class:`TransportHandler`)."""

    server: ModelServer

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return RequestError(status, message).body()

    def _send_error(self, err: RequestError) -> None:
        headers = {}
        if err.status == HTTPStatus.SERVICE_UNAVAILABLE:
            headers["Retry-After"] = "1"
        elif err.status == HTTPStatus.UNAUTHORIZED:
            headers["WWW-Authenticate"] = "Bearer"
        if err.status >= 500:
            self.server.log(f"{client_label(self.client_address)}: {err.status} {err.message}")
        self.send_json(err.status, err.body(), headers)

    def _route(self, method: str) -> None:
        self._id = secrets.token_hex(12)
        self.pending_body = self.announces_body()
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            self._check_host()
            self._check_key()
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
                self.send_json(
                    HTTPStatus.OK, {"status": "ok", "model": server.model_id, "active": server.active_requests}
                )
            else:
                self.close_connection = True
                raise RequestError(HTTPStatus.NOT_FOUND, f"no route {method} {_shown(path or '/')}")
        except RequestError as err:
            self._send_error(err)
        except RequestTimeout:  # handle_one_request answers 408
            raise
        except CLIENT_GONE as err:  # the client left, or stopped reading for the transport's SOCKET_TIMEOUT
            self.close_connection = True
            self.server.log(
                f"{client_label(self.client_address)}: the client went away ({type(err).__name__}) during "
                f"{method} {_shown(path or '/')}"
            )
        except Exception as err:  # a bug must answer 500 and leave the server running
            self.close_connection = True
            self.server.log(f"{client_label(self.client_address)}: internal error: {type(err).__name__}: {err}")
            try:
                self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, RequestError(500, "internal server error").body())
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

    def _check_host(self) -> None:
        allowed = self.server.allowed_hosts
        if allowed is None or ANY_HOST in allowed:
            return
        values = self.headers.get_all("Host") or []
        if len(values) > 1:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the request has more than one Host header")
        if not values:
            if self.request_version in ("HTTP/1.0", "HTTP/0.9"):  # no browser sends these: no rebinding risk
                return
            raise RequestError(HTTPStatus.BAD_REQUEST, "the request has no Host header")
        name = host_name(values[0])
        if name is None or name not in allowed:
            names = ", ".join(f"[{n}]" if ":" in n else n for n in sorted(allowed))
            raise RequestError(
                HTTPStatus.FORBIDDEN,
                f"this server does not answer for Host {_shown(values[0])} (it answers {names}; "
                "start it with --host or --allowed-host to add a name)",
            )

    def _check_key(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        # Header values arrive decoded as Latin-1: encoding them back gives the bytes the client sent.
        sent = str(self.headers.get("Authorization", "")).encode("latin-1", "replace")
        if not hmac.compare_digest(sent, f"Bearer {key}".encode()):
            raise RequestError(HTTPStatus.UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer ...)")

    def _read_body(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding") is not None:
            raise RequestError(
                HTTPStatus.LENGTH_REQUIRED,
                "Transfer-Encoding is not accepted; send the JSON body with a Content-Length",
            )
        lengths = [value.strip() for value in self.headers.get_all("Content-Length") or []]
        if not lengths:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length header and a JSON body")
        if len(set(lengths)) > 1:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the request has Content-Length headers that disagree")
        if not _DIGITS.fullmatch(lengths[0]):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {_shown(lengths[0])}")
        length = int(lengths[0])
        limit = self.server.limits.max_body_bytes
        if length > limit:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body has {length} bytes; this server accepts at most {limit}"
            )
        self._check_content_type()
        raw = self.rfile.read(length)
        self.deadline_reader.deadline = None
        if len(raw) < length:
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(raw)} of {length} bytes")
        self.pending_body = False
        return parse_json_object(raw)

    def _check_content_type(self) -> None:
        # A browser sends text/plain across origins without asking first (no CORS preflight); JSON it must ask for.
        value = str(self.headers.get("Content-Type", ""))
        media, *params = value.split(";")
        pairs = (param.partition("=") for param in params)
        charsets = [v.strip().strip('"').lower() for k, _, v in pairs if k.strip().lower() == "charset"]
        if media.strip().lower() != "application/json" or any(c not in ("utf-8", "utf8") for c in charsets):
            shown = _shown(value) if value else "no Content-Type"
            raise RequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"the body must be sent as Content-Type: application/json (UTF-8), got {shown}",
            )

    def _check_model(self, body: Mapping[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str):
            raise RequestError(HTTPStatus.BAD_REQUEST, "'model' must be a string", "model")
        if model != self.server.model_id:
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                f"the model {_shown(model)} does not exist; this server serves '{self.server.model_id}'",
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
            self.send_json(HTTPStatus.OK, {"object": "list", "data": [server.model_object()]})
            return
        name = path[len("/v1/models/") :]
        if name != server.model_id:
            raise RequestError(
                HTTPStatus.NOT_FOUND, f"the model {_shown(name)} does not exist", None, "model_not_found"
            )
        self.send_json(HTTPStatus.OK, server.model_object())

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
        messages = chat_messages(body, self.server.limits.max_messages)
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
                    self.send_json(HTTPStatus.OK, self._result(pieces.completion, text, chat))
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
            self.wfile.write(f"data: {data}\n\n".encode("utf-8", "backslashreplace"))
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
