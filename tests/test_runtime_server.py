"""The OpenAI-compatible server over real HTTP on 127.0.0.1 (ephemeral port): models, completions and chat, plain
and streamed as server-sent events, the official ``openai`` client as the caller, errors in OpenAI's shape,
limits, concurrent requests, a dropped client, and a full queue."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from runtime_helpers import request as http_request
from runtime_helpers import running, tiny_exports

from edgedistill.runtime import load
from edgedistill.runtime.server import ModelServer, ServerLimits

pytest.importorskip("onnxruntime")
TIMEOUT = 60
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Say something."}]




@pytest.fixture(scope="module")
def model():
    loaded = load(tiny_exports().onnx_dir, threads=1, context=128)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def server(model):
    with running(model, limits=ServerLimits(max_tokens=64, max_body_bytes=4096, max_prompt_tokens=100)) as srv:
        yield srv


def request(server, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """One HTTP request; returns (status, parsed JSON or text)."""
    return http_request(server, method, path, body, headers, raw, timeout=TIMEOUT)


def events(text: str) -> list:
    """The data of each server-sent event, JSON-decoded except the final [DONE]."""
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_binds_to_localhost_by_default(model):
    server = ModelServer(model, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def test_models(server):
    status, body = request(server, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [server.model_id] == ["tiny-student-onnx-fp32"]
    assert request(server, "GET", f"/v1/models/{server.model_id}")[1]["id"] == server.model_id
    assert request(server, "GET", "/v1/models/other")[0] == 404


def test_completion_equals_the_library(server, model):
    body = {"model": server.model_id, "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    status, reply = request(server, "POST", "/v1/completions", body)
    assert status == 200 and reply["object"] == "text_completion"
    expected = model.complete(PROMPT, max_tokens=20)
    choice = reply["choices"][0]
    assert choice["text"] == expected.text and choice["finish_reason"] == expected.finish_reason
    assert reply["usage"] == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": expected.completion_tokens,
        "total_tokens": expected.prompt_tokens + expected.completion_tokens,
    }


def test_streamed_completion_equals_plain(server):
    body = {"model": server.model_id, "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    plain = request(server, "POST", "/v1/completions", body)[1]["choices"][0]
    status, text = request(
        server, "POST", "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert status == 200
    stream = events(text)
    assert stream[-1] == "[DONE]" and stream[-2]["usage"]["completion_tokens"] > 0
    chunks = stream[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1


def test_chat_plain_and_streamed(server, model):
    body = {"model": server.model_id, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    status, reply = request(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and reply["object"] == "chat.completion"
    message = reply["choices"][0]["message"]
    assert message == {"role": "assistant", "content": model.chat(MESSAGES, max_tokens=16)}
    status, text = request(server, "POST", "/v1/chat/completions", {**body, "stream": True})
    stream = events(text)
    assert stream[-1] == "[DONE]" and stream[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in stream[:-1]]
    assert "".join(pieces) == message["content"]
    assert stream[-2]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]
    assert all(c["object"] == "chat.completion.chunk" for c in stream[:-1])


def test_stop_and_seeded_sampling(server, model):
    body = {"model": server.model_id, "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    full = request(server, "POST", "/v1/completions", body)[1]["choices"][0]["text"]
    stop = full[4:7]
    cut = request(server, "POST", "/v1/completions", {**body, "stop": [stop]})[1]["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    sampled = {**body, "temperature": 1.2, "top_p": 0.9, "top_k": 40, "seed": 5}
    first = request(server, "POST", "/v1/completions", sampled)[1]["choices"][0]["text"]
    assert first == request(server, "POST", "/v1/completions", sampled)[1]["choices"][0]["text"]
    assert first == model.generate(PROMPT, max_tokens=20, temperature=1.2, top_p=0.9, top_k=40, seed=5)


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", {"prompt": PROMPT}, 400, "model"),
        ("/v1/completions", {"model": "MODEL"}, 400, "prompt"),
        ("/v1/completions", {"model": "MODEL", "prompt": 5}, 400, "prompt"),
        ("/v1/completions", {"model": "MODEL", "prompt": PROMPT, "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {"model": "MODEL", "prompt": PROMPT, "temperature": True}, 400, "temperature"),
        ("/v1/completions", {"model": "MODEL", "prompt": PROMPT, "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"model": "MODEL", "prompt": PROMPT, "temperature": -1}, 422, "temperature"),
        ("/v1/completions", {"model": "MODEL", "prompt": PROMPT, "top_p": 7}, 422, "top_p"),
        ("/v1/completions", {"model": "MODEL", "prompt": PROMPT, "top_k": -2}, 422, "top_k"),
        ("/v1/completions", {"model": "MODEL", "prompt": PROMPT, "max_tokens": 0}, 422, "max_tokens"),
        ("/v1/completions", {"model": "MODEL", "prompt": PROMPT, "max_tokens": 65}, 422, "max_tokens"),
        ("/v1/completions", {"model": "MODEL", "prompt": PROMPT, "n": 2}, 422, "n"),
        ("/v1/completions", {"model": "MODEL", "prompt": PROMPT, "logprobs": 3}, 422, "logprobs"),
        ("/v1/completions", {"model": "MODEL", "prompt": PROMPT, "stop": ["a"] * 5}, 422, "stop"),
        ("/v1/completions", {"model": "MODEL", "prompt": PROMPT * 40}, 422, "prompt"),
        ("/v1/completions", {"model": "MODEL", "prompt": [10**9]}, 422, "prompt"),
        ("/v1/completions", {"model": "MODEL", "prompt": ""}, 422, "prompt"),
        ("/v1/completions", {"model": "other", "prompt": PROMPT}, 404, "model"),
        ("/v1/chat/completions", {"model": "MODEL"}, 400, "messages"),
        ("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user"}]}, 400, "messages"),
        ("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "robot", "content": "x"}]}, 422, "messages"),
    ],
)
def test_malformed_requests_get_4xx_with_a_message(server, path, body, status, param):
    if body.get("model") == "MODEL":
        body = {**body, "model": server.model_id}
    got, reply = request(server, "POST", path, body)
    assert got == status, reply
    error = reply["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_transport_errors(server):
    assert request(server, "POST", "/v1/completions", raw=b"{not json")[0] == 400
    assert request(server, "POST", "/v1/completions", raw=b"[1, 2]")[0] == 400
    assert request(server, "POST", "/v1/completions", raw=b"\xff\xfe")[0] == 400
    status, reply = request(server, "POST", "/v1/completions", raw=b"x" * 5000)
    assert status == 413 and "4096" in reply["error"]["message"]
    assert request(server, "GET", "/v1/completions")[0] == 405
    assert request(server, "POST", "/v1/models")[0] == 405
    assert request(server, "GET", "/v2/anything")[0] == 404
    # No Content-Length: 411, and the server keeps serving.
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.recv(4096).split(b" ")[1] == b"411"
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw:
        raw.sendall(b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b"".join(iter(lambda: raw.recv(4096), b""))
        assert answer.split(b" ")[1] == b"501" and b'"error"' in answer
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw:
        raw.sendall(b"\x00\x01 garbage \xff\r\n\r\n")
        raw.recv(4096)
    assert request(server, "GET", "/v1/models")[0] == 200


def test_concurrent_requests(server, model):
    expected = model.generate(PROMPT, max_tokens=12)
    results, errors = [], []

    def work(index: int) -> None:
        try:
            body = {"model": server.model_id, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
            if index % 2:
                status, text = request(server, "POST", "/v1/completions", {**body, "stream": True})
                results.append((status, "".join(c["choices"][0]["text"] for c in events(text)[:-1])))
            else:
                status, reply = request(server, "POST", "/v1/completions", body)
                results.append((status, reply["choices"][0]["text"]))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    assert not errors and len(results) == 8
    assert all(result == (200, expected) for result in results)


def test_a_client_that_disconnects_mid_stream_frees_the_model(server):
    body = {"model": server.model_id, "prompt": PROMPT, "max_tokens": 64, "temperature": 0, "stream": True}
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        assert b"200" in raw.recv(64)
    status, _ = request(server, "POST", "/v1/completions", {**body, "stream": False, "max_tokens": 4})
    assert status == 200


def test_full_queue_gets_503(model):
    """With no waiting room, a request that arrives while another holds the only slot is refused at once."""
    with running(model, limits=ServerLimits(max_queue=0)) as server:
        body = {"model": server.model_id, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        held = model.stream(PROMPT, max_tokens=50)
        next(held)  # the model is busy with this generation until it is closed
        first: list = []
        waiting = threading.Thread(target=lambda: first.append(request(server, "POST", "/v1/completions", body)))
        waiting.start()
        try:
            for _ in range(200):  # until the first request has taken the slot and waits for the model
                if server.active_requests == 1:
                    break
                time.sleep(0.05)
            status, reply = request(server, "POST", "/v1/completions", body)
            assert status == 503 and "busy" in reply["error"]["message"]
        finally:
            held.close()
        waiting.join(timeout=TIMEOUT)
        assert first and first[0][0] == 200


def test_api_key(model):
    with running(model, api_key="secret") as server:
        assert request(server, "GET", "/v1/models")[0] == 401
        assert request(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(server, "GET", "/v1/models", headers={"Authorization": "Bearer secret"})[0] == 200


def test_the_official_openai_client(server, model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    assert [m.id for m in client.models.list()] == [server.model_id]

    completion = client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=16, temperature=0)
    assert completion.choices[0].text == model.generate(PROMPT, max_tokens=16)
    assert completion.usage.prompt_tokens == len(model.tokenize(PROMPT))
    streamed = client.completions.create(
        model=server.model_id, prompt=PROMPT, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == completion.choices[0].text

    chat = client.chat.completions.create(model=server.model_id, messages=MESSAGES, max_tokens=16, temperature=0)
    reply = chat.choices[0].message
    assert reply.role == "assistant" and reply.content == model.chat(MESSAGES, max_tokens=16)
    pieces = []
    for chunk in client.chat.completions.create(
        model=server.model_id,
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        else:
            assert chunk.usage.completion_tokens == chat.usage.completion_tokens
    assert "".join(pieces) == reply.content

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt=PROMPT)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.completions.create(model=server.model_id, prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=server.model_id, messages=[])


def test_gguf_model_behind_the_server():
    pytest.importorskip("llama_cpp")
    with load(tiny_exports().gguf, threads=1, context=128) as gguf, running(gguf) as server:
        body = {"model": server.model_id, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
        status, reply = request(server, "POST", "/v1/chat/completions", body)
        assert status == 200 and reply["choices"][0]["message"]["content"] == gguf.chat(MESSAGES, max_tokens=8)
        status, text = request(server, "POST", "/v1/chat/completions", {**body, "stream": True})
        assert (
            "".join(c["choices"][0]["delta"].get("content", "") for c in events(text)[:-1])
            == (reply["choices"][0]["message"]["content"])
        )
