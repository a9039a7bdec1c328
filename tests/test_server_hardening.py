"""The server against careless or hostile clients, over real sockets on 127.0.0.1 with the tiny ONNX model: a burst
of connections, slow and idle sockets, the connection cap, the Host and Content-Type checks, API keys from a file or
the environment, text that is not Unicode, clients that leave mid-request, and a list of malformed HTTP requests.

Requests that test logging run against ``edgedistill serve`` in a child process, whose stderr is read line by line.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import select
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from runtime_helpers import REPO, TESTS, cli, running, tiny_exports

from edgedistill.errors import EdgeDistillError
from edgedistill.runtime import load
from edgedistill.runtime.server import (
    API_KEY_ENV,
    ServerLimits,
    allowed_hosts_for,
    host_name,
    resolve_api_key,
)

pytest.importorskip("onnxruntime")
TIMEOUT = 20  # seconds any one socket operation may take before the test fails (no pytest-timeout here)
PROMPT = "The quick brown fox"
ENV_KEY = "env-secret"


# ------------------------------------------------------------------------------------------------------- helpers




def exchange(port: int, data: bytes, half_close: bool = False) -> tuple[int, http.client.HTTPResponse, bytes]:
    """Send raw bytes, read one reply; a reset or a connection closed without a reply raises."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response, response.read()


def post(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"POST {path} HTTP/1.1\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a client that crashes does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def wait_for(condition, seconds: float = TIMEOUT) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def assert_error_reply(status: int, response: http.client.HTTPResponse, data: bytes, expected: int | None = None):
    assert 400 <= status < 500, (status, data)
    if expected is not None:
        assert status == expected, (status, data)
    assert response.getheader("Content-Type", "").startswith("application/json"), data
    message = json.loads(data)["error"]["message"]
    assert isinstance(message, str) and message
    return message


@pytest.fixture(scope="module")
def model():
    loaded = load(tiny_exports().onnx_dir, threads=1, context=128)
    yield loaded
    loaded.close()


class Served:
    """``edgedistill serve`` in a child process; stdout gives the port, stderr is collected line by line."""

    def __init__(self, *argv: str, env: dict[str, str] | None = None) -> None:
        environ = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
        environ.update(PYTHONUNBUFFERED="1", **(env or {}))
        code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); from runtime_helpers import cli; "
        code += "sys.exit(cli(*sys.argv[1:]))"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, "serve", str(tiny_exports().onnx_dir), "--port", "0", "--threads", "1", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=environ,
        )
        self.stderr: list[str] = []
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stdout], daemon=True).start()
        threading.Thread(target=lambda: [self.stderr.append(line) for line in self.process.stderr], daemon=True).start()
        try:
            first = lines.get(timeout=60)
        except queue.Empty:
            first = ""
        if " at http://127.0.0.1:" not in first:
            self.process.kill()
            self.process.wait(timeout=TIMEOUT)
            pytest.fail(f"edgedistill serve did not start: {first!r} {self.log()}")
        self.port = int(first.split(" at http://127.0.0.1:", 1)[1].split("/", 1)[0])

    def log(self) -> str:
        return "".join(self.stderr)

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


@pytest.fixture(scope="module")
def served():
    """The served tiny model: key from the environment, an extra Host name, a short request deadline."""
    server = Served(
        "--context",
        "512",
        "--max-tokens-limit",
        "500",
        "--max-body-bytes",
        "16384",
        "--request-timeout",
        "3",
        "--allowed-host",
        "api.example.test",
        env={API_KEY_ENV: ENV_KEY},
    )
    yield server
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log()


def headers_for(served, **extra: str) -> dict[str, str]:
    return {
        "Host": f"127.0.0.1:{served.port}",
        "Authorization": f"Bearer {ENV_KEY}",
        "Content-Type": "application/json",
        **extra,
    }


def completion(**fields) -> bytes:
    return json.dumps({"model": "tiny-student-onnx-fp32", "prompt": PROMPT, "max_tokens": 4, **fields}).encode()


# --------------------------------------------------------------------------------------- bursts and slow clients


@pytest.mark.parametrize(
    "limits",
    [ServerLimits(max_connections=16, max_queue=2), ServerLimits()],
    ids=["small-cap", "defaults"],
)
def test_a_burst_of_100_connections_gets_200_or_503_and_no_reset(model, limits):
    with running(model, limits=limits) as server:
        body = json.dumps({"model": server.model_id, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        start = threading.Barrier(100)
        statuses: list[int] = []
        errors: list[BaseException] = []

        def one() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
            try:
                start.wait(timeout=TIMEOUT)
                connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                data = response.read()
                if response.status == 503:
                    assert response.getheader("Retry-After") == "1"
                    assert "try again" in json.loads(data)["error"]["message"]
                statuses.append(response.status)
            except BaseException as err:  # noqa: BLE001 - every failure is reported below
                errors.append(err)
            finally:
                connection.close()

        threads = [threading.Thread(target=one) for _ in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=2 * TIMEOUT)
        assert not errors, errors[:3]
        assert len(statuses) == 100 and set(statuses) <= {200, 503} and 200 in statuses
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        assert connection.getresponse().status == 200
        connection.close()


def test_a_trickled_body_or_header_gets_408_within_the_deadline(model):
    deadline = 1.0
    with running(model, limits=ServerLimits(request_timeout_s=deadline)) as server:
        starts = {
            "body": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50\r\n\r\n",
            "headers": b"POST /v1/completions HTTP/1.1\r\n",
        }
        for what, start in starts.items():
            with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
                began = time.monotonic()
                sock.sendall(start)
                while not select.select([sock], [], [], 0.2)[0]:  # one byte every 0.2 s: each read is quick
                    assert time.monotonic() - began < deadline + 3, f"no reply to a trickled {what}"
                    sock.sendall(b"X-Slow: 1\r\n" if what == "headers" else b" ")
                response = http.client.HTTPResponse(sock)
                response.begin()
                assert response.status == 408, what
                assert "longer than 1 s" in json.loads(response.read())["error"]["message"]
                assert sock.recv(100) == b""  # and the connection is closed
                assert deadline - 0.1 <= time.monotonic() - began < deadline + 2.5, what
        # An idle connection (not one byte sent) is closed at the deadline, without a reply.
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            began = time.monotonic()
            assert sock.recv(100) == b""
            assert time.monotonic() - began < deadline + 2.5
        status, _, _ = exchange(server.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200


def test_idle_sockets_do_not_grow_threads_beyond_the_cap(model):
    cap, opened = 4, 30
    with running(model, limits=ServerLimits(max_connections=cap, request_timeout_s=10)) as server:
        baseline = threading.active_count()
        sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) for _ in range(opened)]
        try:
            pending, refused, end = set(sockets), 0, time.monotonic() + TIMEOUT
            while refused < opened - cap and time.monotonic() < end:
                for sock in select.select(list(pending), [], [], 0.5)[0]:
                    pending.discard(sock)
                    response = http.client.HTTPResponse(sock)
                    response.begin()
                    assert response.status == 503 and response.getheader("Retry-After") == "1"
                    assert "too many connections" in json.loads(response.read())["error"]["message"]
                    refused += 1
            assert refused == opened - cap
            assert not select.select(list(pending), [], [], 0.3)[0]  # the others wait, served by one thread each
            assert threading.active_count() <= baseline + cap
        finally:
            for sock in sockets:
                sock.close()
        # The idle connections end when their clients close; the server answers again.
        assert wait_for(lambda: threading.active_count() <= baseline)
        status, _, _ = exchange(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200


# ------------------------------------------------------------------------------------- Host, key, Content-Type


def test_host_names():
    assert host_name("LocalHost:8000") == "localhost" and host_name("[::1]:80") == "::1"
    assert host_name("example.com.") == "example.com" and host_name("127.0.0.1") == "127.0.0.1"
    for bad in ("", ":80", "::1", "[::1", "a:b", "localhost:80x", "[::1]x"):
        assert host_name(bad) is None, bad
    assert allowed_hosts_for("127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts_for("192.168.1.5", ["Box.Local"]) == {
        "localhost",
        "127.0.0.1",
        "::1",
        "192.168.1.5",
        "box.local",
    }
    assert allowed_hosts_for("[fe80::1]") >= {"fe80::1"} and allowed_hosts_for("fe80::1") >= {"fe80::1"}
    for anything in (("0.0.0.0", ()), ("::", ()), ("127.0.0.1", ["*"])):
        assert allowed_hosts_for(*anything) == {"*"}


def test_the_host_header_is_checked(served):
    port = served.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "api.example.test"):
        status, _, data = exchange(port, post("/v1/completions", completion(), headers_for(served, Host=host)))
        assert status == 200, (host, data)
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io"):
        status, response, data = exchange(port, post("/v1/completions", completion(), headers_for(served, Host=host)))
        assert "does not answer for Host" in assert_error_reply(status, response, data, 403), host
    # HTTP/1.1 needs exactly one Host.
    no_host = f"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {ENV_KEY}\r\n\r\n".encode()
    assert_error_reply(*exchange(port, no_host), 400)
    two = f"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nAuthorization: Bearer {ENV_KEY}\r\n\r\n"
    assert_error_reply(*exchange(port, two.encode()), 400)


def test_the_api_key_from_the_environment(served):
    request = "GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{}\r\n"
    for auth in ("", "Authorization: Bearer wrong\r\n", "Authorization: env-secret\r\n", "Authorization: Bearer é\r\n"):
        status, response, data = exchange(served.port, request.format(auth).encode("utf-8"))
        assert_error_reply(status, response, data, 401)
        assert response.getheader("WWW-Authenticate") == "Bearer"
    status, _, data = exchange(served.port, request.format(f"Authorization: Bearer {ENV_KEY}\r\n").encode())
    assert status == 200 and json.loads(data)["data"][0]["id"] == "tiny-student-onnx-fp32"


def test_the_api_key_from_a_file_wins_over_the_environment(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("file-secret\n")
    server = Served("--api-key-file", str(key_file), env={API_KEY_ENV: "env-other"})
    try:
        request = "GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n"
        assert exchange(server.port, request.format("file-secret").encode())[0] == 200
        assert exchange(server.port, request.format("env-other").encode())[0] == 401
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.log()


def test_api_key_precedence_and_errors(tmp_path, capsys):
    key_file = tmp_path / "key"
    key_file.write_text("  from-file \n")
    env = {API_KEY_ENV: "from-env"}
    assert resolve_api_key("from-flag", key_file, env) == "from-flag"
    assert resolve_api_key(None, key_file, env) == "from-file"
    assert resolve_api_key(None, None, env) == "from-env"
    assert resolve_api_key(None, None, {}) is None
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "two").write_text("a\nb\n")
    for key_path, fragment in (("missing", "cannot read"), ("empty", "empty"), ("two", "one line")):
        with pytest.raises(EdgeDistillError, match=fragment) as caught:
            resolve_api_key(None, tmp_path / key_path, env)
        assert str(tmp_path / key_path) in str(caught.value)
    with pytest.raises(EdgeDistillError, match=API_KEY_ENV):
        resolve_api_key(None, None, {API_KEY_ENV: " "})
    # Through the CLI: one line naming the file, before the model loads.
    missing = tmp_path / "no-such-key"
    assert cli("serve", str(tiny_exports().onnx_dir), "--port", "0", "--api-key-file", str(missing)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and lines[0].startswith("edgedistill: error:")


@pytest.mark.parametrize(
    "content_type, status",
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        (None, 415),
        ("application/json; charset=latin-1", 415),
        ("application/jsonp", 415),
        ("application/json", 200),
        ("Application/JSON; charset=UTF-8", 200),
        ('application/json;charset="utf-8"', 200),
    ],
)
def test_the_body_must_be_declared_json(served, content_type, status):
    headers = headers_for(served)
    del headers["Content-Type"]
    if content_type is not None:
        headers["Content-Type"] = content_type
    got, response, data = exchange(served.port, post("/v1/completions", completion(), headers))
    if status == 200:
        assert got == 200, data
    else:
        assert "application/json" in assert_error_reply(got, response, data, status)


# --------------------------------------------------------------------------------------- text and disconnects


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt": "\ud800 lone"}, "prompt"),
        ({"prompt": ["\udfff"]}, "prompt"),
        ({"model": "x\udcff"}, "model"),  # a message that quoted it could not be encoded: the connection dropped
        ({"stop": ["\ud83d"]}, "stop"),
        ({"\ud800": 1}, None),
    ],
)
def test_lone_surrogates_get_400_and_a_reply(served, fields, param):
    body = completion(**fields)  # json.dumps writes them as "\\udxxx" escapes: valid JSON, not text
    status, response, data = exchange(served.port, post("/v1/completions", body, headers_for(served)))
    assert "surrogate" in assert_error_reply(status, response, data, 400)
    assert json.loads(data)["error"]["param"] == param
    chat = json.dumps({"model": "tiny-student-onnx-fp32", "messages": [{"role": "user", "content": "\ud800"}]})
    status, response, data = exchange(served.port, post("/v1/chat/completions", chat.encode(), headers_for(served)))
    assert "messages[0].content" in assert_error_reply(status, response, data, 400)


def test_a_client_that_leaves_is_one_line_in_the_log(served):
    # Mid-stream: a long streamed completion, a small receive window, then a reset after the first bytes.
    body = completion(max_tokens=480, stream=True)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", served.port))
    streaming = sock.getsockname()[1]
    sock.sendall(post("/v1/completions", body, headers_for(served)))
    assert sock.recv(64).startswith(b"HTTP/1.1 200")
    reset(sock)
    # Mid-body: the headers promise 100 bytes, 10 arrive, then a reset.
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT)
    reading = sock.getsockname()[1]
    head = post("/v1/completions", b"", headers_for(served)).replace(b"Content-Length: 0", b"Content-Length: 100")
    sock.sendall(head + b'{"model": ')
    time.sleep(0.2)
    reset(sock)

    def lines_for(port: int) -> list[str]:
        return [line for line in served.stderr if f"127.0.0.1:{port}:" in line]

    assert wait_for(lambda: lines_for(streaming) and lines_for(reading), 10), served.log()
    time.sleep(0.3)  # a second line, were there one, would be out by now
    for port, during in ((streaming, 'POST "/v1/completions"'), (reading, 'POST "/v1/completions"')):
        lines = lines_for(port)
        assert len(lines) == 1 and "the client went away" in lines[0] and during in lines[0], lines
    assert "Traceback" not in served.log()
    assert exchange(served.port, post("/v1/completions", completion(), headers_for(served)))[0] == 200


# ------------------------------------------------------------------------------------------ malformed requests

OK_HEAD = "Host: localhost\r\nAuthorization: Bearer env-secret\r\nContent-Type: application/json\r\n"
MODEL = '"model": "tiny-student-onnx-fp32"'


def _post_raw(body: bytes, head: str = OK_HEAD, length: str | None = None, path: str = "/v1/completions") -> bytes:
    length_line = "" if length == "" else f"Content-Length: {len(body) if length is None else length}\r\n"
    return f"POST {path} HTTP/1.1\r\n{head}{length_line}\r\n".encode() + body


def _fields(text: str, path: str = "/v1/completions") -> bytes:
    return _post_raw(("{" + MODEL + ", " + text + "}").encode(), path=path)


MALFORMED = {
    # the body
    "not json": (_post_raw(b"{not json"), 400),
    "json array": (_post_raw(b"[1, 2]"), 400),
    "json string": (_post_raw(b'"hello"'), 400),
    "empty body": (_post_raw(b""), 400),
    "utf-8 bom": (_post_raw(b"\xef\xbb\xbf{}"), 400),
    "invalid utf-8": (_post_raw(b'{"model": "\xff\xfe"}'), 400),
    "NaN": (_fields('"prompt": "hi", "temperature": NaN'), 400),
    "Infinity": (_fields('"prompt": "hi", "top_p": -Infinity'), 400),
    "1e400": (_fields('"prompt": "hi", "temperature": 1e400'), 400),
    "100-digit integer": (_fields('"prompt": "hi", "max_tokens": ' + "9" * 100), 422),
    "5000-digit integer": (_fields('"prompt": "hi", "seed": ' + "9" * 5000), 400),
    "nested 100 deep": (_fields('"prompt": ' + "[" * 100 + "]" * 100), 400),
    "nested 8000 deep": (_post_raw(b"[" * 8000 + b"]" * 8000), 400),
    # fields
    "no model": (_post_raw(b'{"prompt": "hi"}'), 400),
    "model is a list": (_post_raw(b'{"model": ["x"], "prompt": "hi"}'), 400),
    "prompt is an object": (_fields('"prompt": {"text": "hi"}'), 400),
    "prompt of floats": (_fields('"prompt": [1.5, 2]'), 400),
    "prompt of bools": (_fields('"prompt": [true, false]'), 400),
    "empty prompt list": (_fields('"prompt": []'), 400),
    "bool max_tokens": (_fields('"prompt": "hi", "max_tokens": true'), 400),
    "float max_tokens": (_fields('"prompt": "hi", "max_tokens": 2.5'), 400),
    "negative max_tokens": (_fields('"prompt": "hi", "max_tokens": -5'), 422),
    "huge max_tokens": (_fields('"prompt": "hi", "max_tokens": 1000000000000'), 422),
    "bool n": (_fields('"prompt": "hi", "n": true'), 400),
    "negative seed": (_fields('"prompt": "hi", "seed": -1'), 422),
    "seed beyond 2**63": (_fields('"prompt": "hi", "seed": 99999999999999999999'), 422),
    "tiny temperature": (_fields('"prompt": "hi", "temperature": 1e-300'), 422),
    "tiny repetition_penalty": (_fields('"prompt": "hi", "repetition_penalty": 1e-30'), 422),
    "huge repetition_penalty": (_fields('"prompt": "hi", "repetition_penalty": 1e300'), 422),
    "stop of numbers": (_fields('"prompt": "hi", "stop": [1, 2]'), 400),
    "empty stop": (_fields('"prompt": "hi", "stop": [""]'), 422),
    "stream as a string": (_fields('"prompt": "hi", "stream": "yes"'), 400),
    "messages is a string": (_fields('"messages": "hi"', "/v1/chat/completions"), 400),
    "message is a list": (_fields('"messages": [["user", "hi"]]', "/v1/chat/completions"), 400),
    "message content is a number": (
        _fields('"messages": [{"role": "user", "content": 5}]', "/v1/chat/completions"),
        400,
    ),
    "1100 messages": (_fields('"messages": [' + ", ".join(["{}"] * 1100) + "]", "/v1/chat/completions"), 422),
    # framing
    "Content-Length abc": (_post_raw(b"{}", length="abc"), 400),
    "Content-Length -1": (_post_raw(b"{}", length="-1"), 400),
    "Content-Length +2": (_post_raw(b"{}", length="+2"), 400),
    "Content-Length 1_0": (_post_raw(b"{}", length="1_0"), 400),
    "Content-Length huge": (_post_raw(b"{}", length="99999999999999999999999"), 413),
    "Content-Length over the limit": (_post_raw(b"{}" + b" " * 17000), 413),
    "two Content-Lengths": (_post_raw(b"{}", head=OK_HEAD + "Content-Length: 5\r\n"), 400),
    "no Content-Length": (_post_raw(b"", length=""), 411),
    "chunked": (_post_raw(b"2\r\n{}\r\n0\r\n\r\n", head=OK_HEAD + "Transfer-Encoding: chunked\r\n", length=""), 411),
    "chunked and Content-Length": (_post_raw(b"{}", head=OK_HEAD + "Transfer-Encoding: chunked\r\n"), 411),
    "body shorter than Content-Length": (_post_raw(b"{}", length="10"), 400),  # the client then half-closes
    "wrong method": (b"PUT /v1/completions HTTP/1.1\r\n" + OK_HEAD.encode() + b"Content-Length: 2\r\n\r\n{}", 405),
    "GET with a body": (b"GET /v1/completions HTTP/1.1\r\n" + OK_HEAD.encode() + b"Content-Length: 2\r\n\r\n{}", 405),
    "unknown path": (b"GET /v1/\xff\xfe HTTP/1.1\r\n" + OK_HEAD.encode() + b"\r\n", 404),
    # the request line and headers
    "garbage request line": (b"\x00\x01 garbage \xff\r\n\r\n", 400),
    "bad HTTP version": (b"GET /v1/models HTTP/1.x\r\n\r\n", 400),
    "two empty lines": (b"\r\n\r\n", 400),
    "a 70 kB header": (b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    "200 headers": (b"GET /v1/models HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431),
    "a 70 kB request line": (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
}


def test_the_malformed_list_is_long_enough():
    assert len(MALFORMED) >= 15


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_requests_get_4xx_with_json_and_a_reply(served, name):
    data, expected = MALFORMED[name]
    status, response, body = exchange(served.port, data, half_close=name == "body shorter than Content-Length")
    assert_error_reply(status, response, body, expected)
    assert served.process.poll() is None, served.log()
    assert "Traceback" not in served.log() and "internal error" not in served.log()
