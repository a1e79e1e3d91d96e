"""`axiom serve` as clients see it: real server processes on 127.0.0.1 (free ports), called with the official
`openai` client and with raw HTTP. Greedy text equals `axiom generate`'s alone and with 8 other requests in
flight; bad requests get OpenAI-shaped errors and the server lives on; a full queue answers 503; a client that
disconnects frees its slot; SIGTERM lets the request in flight finish and exits 0.

The model is a random micro model with the cl100k vocabulary (untied output layer, context 4096). Why exact
equality under load is a fair test: a batched decoding step may sum in another order than a lone one, which moves
logits by ~1e-7 (tests/test_engine.py bounds it by 1e-5); the test checks that every greedy choice it compares
wins by more than 1e-4, so no rounding can flip one, and then demands identical text."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import importlib.util
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import save_model
from decode_helpers import scripted_chat_checkpoint

from axiom.cli import main
from axiom.config import get_config
from axiom.infer.generate import generate
from axiom.model.checkpoint import load_model
from axiom.model.transformer import Axiom
from axiom.text.stream import token_bytes
from axiom.text.tokenizer import EOS_ID, load_tokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
MICRO = ["d_model=32", "n_layers=2", "n_heads=2", "n_kv_heads=1", "ffn_multiple_of=32", "max_seq_len=4096"]
PROMPTS = [
    "Hello world",
    "The quick brown fox",
    "def main():\n    return",
    "Once upon a time",
    "1, 2, 3, 4,",
    "Paris is the capital of",
    "import torch",
    "Dear Sir or Madam,",
    "In 1492, Columbus",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = get_config("tiny", [*MICRO, "tie_embeddings=false"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("serve_ckpt")
    save_model(Axiom(cfg.model), cfg, path, step=0)
    return path


class Server:
    """`axiom serve` in a child process on a free port; stderr goes to a file the test can read."""

    def __init__(self, ckpt: Path, log: Path, *args: str, launcher: tuple[str, ...] = ("-m", "axiom.cli")):
        self.log = log
        cmd = [sys.executable, *launcher, "serve", "--ckpt", str(ckpt), "--port", "0", *args]
        with log.open("w") as stderr:  # the child holds its own copy
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            first = lines.get(timeout=120)
        except queue.Empty:  # killed below, not left serving past its test; its stderr says how far it got
            first = "(no line within 120 s)"
        if " on http://" not in first:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            raise RuntimeError(f"axiom serve did not start: {first!r} {log.read_text()[-2000:]}")
        self.url = first.split(" on ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        self.port = int(self.url.split(":")[2].split("/")[0])
        self.name = first.removeprefix("axiom serve: ").split(" on http://")[0]
        self.client = openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=60)

    def http(self, method: str, path: str, body: bytes | str | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        status, data = response.status, json.loads(response.read())
        conn.close()
        return status, data

    def stop(self) -> None:
        self.client.close()  # the connections it keeps alive
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    s = Server(ckpt, tmp_path_factory.mktemp("serve_log") / "stderr.txt", "--max-batch", "16")
    yield s
    s.stop()


def cli_generate(ckpt: Path, prompt: str, n: int, capsys) -> str:
    """The continuation `axiom generate` prints for `prompt` at temperature 0."""
    assert (
        main(["generate", "--ckpt", str(ckpt), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(n)])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith(prompt) and out.endswith("\n")
    return out[len(prompt) : -1]


def min_greedy_margin(ckpt: Path, prompt: str, n: int) -> float:
    """The smallest lead of the chosen token's logit over the runner-up, over the n greedy steps after `prompt`."""
    model = load_model(ckpt)[0].eval()
    ids = load_tokenizer().encode_ordinary(prompt)
    new = generate(model, [ids], n, temperature=0.0, eos_id=EOS_ID)[0]
    with torch.no_grad():
        logits = model(torch.tensor([ids + new]))[0, len(ids) - 1 : len(ids) + len(new) - 1]
    top = logits.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def test_completions_streaming_and_not_with_the_openai_client(server):
    assert [m.id for m in server.client.models.list().data] == [server.name]
    done = server.client.completions.create(model=server.name, prompt="Hello world", max_tokens=12, temperature=0)
    choice = done.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (2, 12, 14)
    chunks = list(
        server.client.completions.create(
            model=server.name,
            prompt="Hello world",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    # A stop string ends the text before it, with finish_reason "stop".
    stop = choice.text[len(choice.text) // 2 :][:3]
    cut = server.client.completions.create(
        model=server.name, prompt="Hello world", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == choice.text[: choice.text.index(stop)] and cut.choices[0].finish_reason == "stop"
    # Sampling: a seed reproduces, top_p and temperature are taken.
    kw = dict(model=server.name, prompt="Once upon a time", max_tokens=16, temperature=0.9, top_p=0.9)
    a, b = (server.client.completions.create(seed=5, **kw).choices[0].text for _ in range(2))
    assert a == b != server.client.completions.create(seed=6, **kw).choices[0].text
    # Server-sent events end with [DONE].
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(
        "POST", "/v1/completions", json.dumps({"model": server.name, "prompt": "hi", "max_tokens": 3, "stream": True})
    )
    response = conn.getresponse()
    events = response.read().decode().split("\n\n")
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    conn.close()


def test_greedy_text_equals_axiom_generate_alone_and_with_8_requests_in_flight(server, ckpt, capsys):
    target, n = PROMPTS[0], 48
    expected = cli_generate(ckpt, target, n, capsys)
    assert min_greedy_margin(ckpt, target, n) > 1e-4
    alone = server.client.completions.create(model=server.name, prompt=target, max_tokens=n, temperature=0)
    assert alone.choices[0].text == expected
    # Eight long requests, greedy and sampled, are decoding (each has sent its first token) when the target joins
    # their batch, and all eight are still decoding when the target has finished.
    streams = [
        server.client.completions.create(
            model=server.name, prompt=p, max_tokens=1000, temperature=0.8 * (i % 2), seed=i, stream=True
        )
        for i, p in enumerate(PROMPTS[1:])
    ]
    for stream in streams:
        next(iter(stream))
    assert server.http("GET", "/health")[1]["running"] == 8
    under_load = server.client.completions.create(model=server.name, prompt=target, max_tokens=n, temperature=0)
    assert server.http("GET", "/health")[1]["running"] == 8
    assert under_load.choices[0].text == expected
    for stream in streams:
        stream.close()  # cancels them
    wait_for(lambda: server.http("GET", "/health")[1]["accepted"] == 0)


def test_chat_without_a_template_is_refused_in_one_error(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 400
    assert 'config.json lacks "chat_template": "chatml"' in e.value.body["message"]


def test_chat_with_the_chatml_template(ckpt, tmp_path):
    import axiom.text.chatml as chat

    chat_ckpt = tmp_path / "chat_ckpt"
    chat_ckpt.mkdir()
    (chat_ckpt / "model.safetensors").symlink_to(ckpt / "model.safetensors")
    meta = json.loads((ckpt / "config.json").read_text())
    (chat_ckpt / "config.json").write_text(json.dumps({**meta, "chat_template": "chatml"}))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    model = load_model(chat_ckpt)[0].eval()
    ids = chat.encode_chat(messages, add_generation_prompt=True).ids
    new = generate(model, [ids], 20, temperature=0.0)[0]
    stops = [i for i, t in enumerate(new) if t in (chat.IM_END, EOS_ID)]
    new = new[: stops[0]] if stops else new
    s = Server(chat_ckpt, tmp_path / "stderr.txt")
    try:
        reply = s.client.chat.completions.create(model=s.name, messages=messages, max_tokens=20, temperature=0)
        enc = load_tokenizer()
        assert reply.choices[0].message.content == b"".join(token_bytes(enc, t) for t in new).decode(errors="replace")
        assert reply.choices[0].finish_reason == ("stop" if stops else "length")
        chunks = list(
            s.client.chat.completions.create(model=s.name, messages=messages, max_tokens=20, temperature=0, stream=True)
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
        as_parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        again = s.client.chat.completions.create(model=s.name, messages=as_parts, max_tokens=20, temperature=0)
        assert again.choices[0].message.content == reply.choices[0].message.content
    finally:
        s.stop()


def test_a_chat_reply_ends_where_the_model_starts_another_turn(tmp_path):
    """The one stop rule: a chat reply ends at <|im_start|> too (the model's invented next turn is not sent); so
    does a plain completion of a chat-tuned model, as its export's generation_config and llama.cpp end it (its
    text ran on through the turn's end, shown as U+FFFD)."""
    import axiom.text.chatml as chat

    enc = load_tokenizer()
    newline, hi, there, user = (enc.encode_ordinary(t)[0] for t in ("\n", "Hi", " there", "user"))
    # after the generation prompt's "\n": "Hi there", then a new turn "<|im_start|>user\n", "Hi there", ...
    chain = {newline: hi, hi: there, there: chat.IM_START, chat.IM_START: user, user: newline}
    s = Server(scripted_chat_checkpoint(tmp_path / "ckpt", chain), tmp_path / "stderr.txt")
    try:
        messages = [{"role": "user", "content": "Hello!"}]
        reply = s.client.chat.completions.create(model=s.name, messages=messages, max_tokens=20, temperature=0)
        assert reply.choices[0].message.content == "Hi there" and reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == 3  # "Hi", " there", <|im_start|>
        chunks = list(
            s.client.chat.completions.create(model=s.name, messages=messages, max_tokens=20, temperature=0, stream=True)
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hi there"
        plain = s.client.completions.create(model=s.name, prompt=[newline], max_tokens=6, temperature=0)
        assert plain.choices[0].text == "Hi there" and plain.choices[0].finish_reason == "stop"
    finally:
        s.stop()


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        (b"{not json", 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, None),
        ({"model": None, "prompt": "hi"}, 400, "model", None),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "model_not_found"),
        ({"prompt": 5}, 400, "prompt", None),
        ({"prompt": "hi", "max_tokens": "8"}, 400, "max_tokens", None),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
        ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", None),
        ({"prompt": "hi", "max_tokens": True}, 400, "max_tokens", None),
        ({"prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
        ({"prompt": "hi", "temperature": -1}, 400, "temperature", None),
        ({"prompt": "hi", "top_p": 0}, 400, "top_p", None),
        ({"prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
        ({"prompt": "hi", "stop": [1]}, 400, "stop", None),
        ({"prompt": "hi", "stream": "yes"}, 400, "stream", None),
        ({"prompt": "hi", "n": 2}, 400, "n", None),
        ({"prompt": "hi", "seed": 2**64}, 400, "seed", None),
        ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": 1}}, 400, "include_usage", None),
        ({"prompt": "hi " * 5000}, 400, "prompt", "context_length_exceeded"),
        # malformed beyond a wrong field: each was a 500 with a traceback in the log, or a value ignored
        (b"[" * 100_000 + b"]" * 100_000, 400, None, "invalid_json"),  # RecursionError
        (b'{"model": "m", "max_tokens": ' + b"9" * 5000 + b"}", 400, None, "invalid_json"),  # int() refuses
        (b'{"model": "m", "seed": -' + b"9" * 5000 + b"}", 400, None, "invalid_json"),
        (b'{"model": "\xff\xfe", "prompt": "hi"}', 400, None, "invalid_json"),
        (b'{"model": "m", "prompt": "\xc3\x28"}', 400, None, "invalid_json"),  # not UTF-8
        (b'{"model": "m", "prompt": "hi", "temperature": NaN}', 400, None, "invalid_json"),
        (b'"a string"', 400, None, None),
        (b"null", 400, None, None),
        ({"prompt": "hi", "temperature": 10**400}, 400, None, "invalid_json"),  # was an OverflowError in float()
        (b'{"model": "MODEL", "prompt": "hi", "temperature": 1e400}', 400, "temperature", None),  # read as inf
        ({"prompt": "hi", "stop": ["a"] * 5}, 400, "stop", None),
        ({"prompt": "hi", "stop": "x" * 257}, 400, "stop", None),
        ({"prompt": "hi", "temprature": 0}, 400, "temprature", "unknown_field"),  # a typo is not ignored
        (b'{"model": "MODEL", "prompt": "hi", "\\ud800": 1}', 400, "\ud800", "unknown_field"),  # was a 500
        (b'{"model": "MODEL", "prompt": "\xed\xa0\x80 hi"}', 400, None, "invalid_json"),  # a surrogate in UTF-8
        ('{"model": "m", "prompt": "hi"}'.encode("utf-16"), 400, None, "invalid_json"),  # not UTF-8 either
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", None),  # no stream
        ({"prompt": "hi", "stream": True, "stream_options": {"usage": True}}, 400, "stream_options", "unknown_field"),
        ({"prompt": "hi", "messages": []}, 400, "messages", "unknown_field"),  # a chat field on completions
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_lives_on(server, body, status, param, code):
    if isinstance(body, dict):
        body = json.dumps({"model": server.name, **body})
    else:
        body = body.replace(b"MODEL", server.name.encode())
    got_status, got = server.http("POST", "/v1/completions", body)
    assert got_status == status
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}
    assert (got["error"]["param"], got["error"]["code"]) == (param, code)
    assert got["error"]["type"] == "invalid_request_error" and got["error"]["message"]
    assert server.http("GET", "/v1/models")[0] == 200


def test_malformed_bodies_are_named_and_every_error_is_ascii_json():
    """The lines the malformed-request row shows, word for word, and an error naming a lone surrogate (a field
    name `\\ud800`) is ASCII JSON that reads back as sent (it was a 500: UTF-8 cannot encode it)."""
    from axiom.infer.openai_api import ApiError, check_content_type, parse_body
    from axiom.infer.serve import error_response

    for raw, why in [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "an integer of 5,000 digits; at most 32 are read"),
    ]:
        with pytest.raises(ApiError) as e:
            parse_body(raw)
        assert (e.value.status, e.value.code, e.value.message) == (
            400,
            "invalid_json",
            f"the body is not valid JSON ({why})",
        )
    with pytest.raises(ApiError) as e:
        check_content_type("application/x-www-form-urlencoded")
    assert (e.value.status, e.value.message) == (
        415,
        "Content-Type 'application/x-www-form-urlencoded': the body must be JSON in UTF-8 (curl: -H 'Content-Type: "
        "application/json')",
    )
    surrogate = ApiError(400, "unrecognized request argument '\ud800'", param="\ud800", code="unknown_field")
    sent = error_response(surrogate).body
    assert sent.isascii() and json.loads(sent) == surrogate.body()


def test_unknown_routes_and_methods_get_openai_errors(server):
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)]:
        got_status, got = server.http(method, path)
        assert got_status == status and got["error"]["message"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("DELETE", "/health")
    response = conn.getresponse()
    assert response.status == 405 and response.getheader("Allow") and "GET" in response.getheader("Allow")
    conn.close()


def request_with(port: int, method: str, path: str, headers: dict, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    payload = json.dumps(body) if body is not None else None
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **headers})
    response = conn.getresponse()
    status, data = response.status, response.read()
    conn.close()
    return status, json.loads(data) if data.startswith(b"{") else {"headers": dict(response.getheaders())}


def test_requests_a_web_page_on_another_site_could_send_are_refused(server):
    """A page on any site can make its visitor's browser POST here (a no-cors fetch without a Content-Type is
    sent without asking), and a site's own name resolved to 127.0.0.1 after its page loaded (DNS rebinding) makes
    its page pass as this server's: both were answered in full."""
    body = {"model": server.name, "prompt": "Hello", "max_tokens": 2}
    here = f"127.0.0.1:{server.port}"
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{server.port + 1}", "https://127.0.0.1"):
        status, answer = request_with(server.port, "POST", "/v1/completions", {"Origin": origin}, body)
        assert status == 403 and answer["error"]["code"] == "cross_origin", origin
        assert answer["error"]["message"].startswith(
            f"POST from the web page at {origin!r}, not this server's own page ({here}): refused, "
        )
    for site in ("cross-site", "same-site"):  # what the browser says of the page (no page can set it)
        for headers in ({"Origin": f"http://{here}", "Sec-Fetch-Site": site}, {"Sec-Fetch-Site": site}):
            assert request_with(server.port, "POST", "/v1/completions", headers, body)[0] == 403, headers
    for origin in ("http://[::1", "ftp://127.0.0.1", f"http://127.0.0.1:0{server.port}x"):  # malformed: 403, not 500
        assert request_with(server.port, "POST", "/v1/completions", {"Origin": origin}, body)[0] == 403, origin
    for host in (f"rebind.attacker.example:{server.port}", "192.168.1.5", "localhost.evil.example"):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/")):
            status, answer = request_with(server.port, method, path, {"Host": host, "Origin": f"http://{host}"}, body)
            assert status == 403 and answer["error"]["code"] == "host_not_allowed", (host, path)
            name = host.split(":")[0]
            assert answer["error"]["message"] == (
                f"Host {host!r}: this server listens on a loopback address and answers localhost, loopback "
                f"addresses only (another name that leads here may be a web page's); to answer {name}, pass "
                f"--allow-host {name}"
            )
    # the server's own page, loopback names, a proxy's public name, and programs (no Origin) are answered
    for headers in (
        {"Origin": f"http://{here}"},
        {"Host": f"localhost:{server.port}", "Origin": f"http://localhost:{server.port}"},
        {"Host": f"[::1]:{server.port}"},
        {"Host": "app.localhost"},
        {"Origin": "https://chat.example.org", "X-Forwarded-Host": "chat.example.org:443"},  # the scheme's port
        # behind a proxy that sends its own address as Host (nginx's default): the browser says same-origin
        {"Origin": "https://chat.example.org", "Sec-Fetch-Site": "same-origin"},
        {},
    ):
        status, answer = request_with(server.port, "POST", "/v1/completions", headers, body)
        assert status == 200 and answer["choices"][0]["text"], headers
    # a link from another site still opens the page (a GET changes nothing), which no site may frame
    status, answer = request_with(server.port, "GET", "/", {"Origin": "http://evil.example"})
    assert status == 200
    assert "frame-ancestors 'none'" in answer["headers"]["content-security-policy"]
    assert answer["headers"]["x-content-type-options"] == "nosniff"
    # no CORS header lets another site's page read an answer (a GET is answered, to the browser alone)
    for method, path, payload in (("GET", "/v1/models", None), ("POST", "/v1/completions", body), ("GET", "/", None)):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request(method, path, body=payload and json.dumps(payload), headers={"Origin": "http://evil.example"})
        response = conn.getresponse()
        response.read()
        assert not [h for h, _ in response.getheaders() if h.lower().startswith("access-control-")], path
        conn.close()


def raw_stream(port: int, body: dict, wait: bool = True) -> tuple[socket.socket, object]:
    """Send a streaming completion over a bare socket (so that the test can drop it) and return the socket and a
    reader, positioned after the first token's event if `wait`. HTTP/1.0: the events come unchunked, as they are."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    data = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = f"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    reader = sock.makefile("rb")
    if wait:
        assert b" 200 " in reader.readline()
        headers = []
        while not (line := reader.readline()).startswith(b"data: {"):  # the headers, then the first token's event
            headers.append(line.strip().lower())
        assert b"cache-control: no-cache" in headers and b"x-accel-buffering: no" in headers  # for proxies
        # HTTP/1.0 has no chunked encoding (uvicorn's httptools protocol used it, where httptools was installed)
        assert not any(h.startswith(b"transfer-encoding") for h in headers)
    return sock, reader


def drop(sock: socket.socket, reader: object = None) -> None:
    """Disconnect at once (a plain close would wait for the reader made from the socket to be closed too), and close
    that reader: until then the socket holds its descriptor (ResourceWarning: unclosed socket)."""
    sock.shutdown(socket.SHUT_RDWR)
    if reader is not None:
        reader.close()
    sock.close()


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@contextlib.contextmanager
def serving(service) -> Iterator[int]:
    """An in-process Service (axiom.infer.serve) started and answering HTTP on a free port, which is yielded; both
    stopped on leaving."""
    import uvicorn

    from axiom.cli.serve import UVICORN_RUNTIME
    from axiom.infer.serve import build_app

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(service), log_level="warning", **UVICORN_RUNTIME))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    service.start()
    thread.start()
    try:
        wait_for(lambda: server.started)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join()
        service.stop()


def test_full_queue_answers_503_and_disconnects_free_their_slots(ckpt, tmp_path):
    s = Server(ckpt, tmp_path / "stderr.txt", "--max-batch", "1", "--max-queue", "2")

    def health() -> dict:
        return s.http("GET", "/health")[1]

    try:
        long = {"model": s.name, "prompt": "Hello", "max_tokens": 4000, "temperature": 0}
        running = raw_stream(s.port, long)
        queued_stream = raw_stream(s.port, long, wait=False)
        queued = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        queued.request("POST", "/v1/completions", json.dumps(long))  # non-streaming, waits for the slot
        wait_for(lambda: health()["accepted"] == 3)
        with pytest.raises(openai.InternalServerError) as e:
            s.client.completions.create(model=s.name, prompt="Hello", max_tokens=5)
        assert e.value.status_code == 503 and e.value.body["code"] == "busy"
        drop(*queued_stream)  # a streaming client that leaves before its first token: it leaves the queue
        wait_for(lambda: health() == {"status": "ok", "running": 1, "waiting": 1, "accepted": 2})
        drop(*running)  # a client that leaves mid-stream: its slot passes to the waiting request
        wait_for(lambda: health() == {"status": "ok", "running": 1, "waiting": 0, "accepted": 1})
        drop(queued.sock)  # a non-streaming client that leaves while decoding
        wait_for(lambda: health()["accepted"] == 0)
        cancelled = [line for line in (tmp_path / "stderr.txt").read_text().splitlines() if "cancelled after" in line]
        assert len(cancelled) == 3 and all(int(line.split()[-2]) < 4000 for line in cancelled)
        ok = s.client.completions.create(model=s.name, prompt="Hello", max_tokens=5, temperature=0)
        assert ok.choices[0].finish_reason == "length"
    finally:
        s.stop()


def trickled_body(port: int, body: str) -> socket.socket:
    """A connection that sent its request's head and, once the server reads the body (its 100 Continue), the first
    10 bytes of it: a request in flight."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    reply = b""
    while not reply.endswith(b"\r\n\r\n"):
        reply += sock.recv(1)
    assert reply.startswith(b"HTTP/1.1 100 "), reply
    sock.sendall(body[:10].encode())
    return sock


def test_a_trickled_body_times_out_and_connections_are_capped(ckpt, tmp_path):
    """A client that sends its headers and then stops sending its body gets 408 after --body-timeout, while another
    client is answered meanwhile; with a request in flight on each of --max-connections, a request is answered 503
    (JSON, `busy`) until they end."""
    s = Server(ckpt, tmp_path / "stderr.txt", "--body-timeout", "1.5", "--max-connections", "4")
    body = json.dumps({"model": s.name, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    try:
        slow = trickled_body(s.port, body)
        start = time.monotonic()
        assert post_raw(s.port, body)[0] == 200  # answered while the slow body is pending
        assert s.http("GET", "/health")[1]["accepted"] == 0  # the slow body holds no engine slot
        reply = http.client.HTTPResponse(slow)
        reply.begin()
        error = json.loads(reply.read())["error"]
        assert (reply.status, error["code"], error["message"]) == (
            408,
            "body_timeout",
            "the body did not arrive within 1.5 s",
        )
        assert 1.4 < time.monotonic() - start < 20
        slow.close()
        busy = [trickled_body(s.port, body) for _ in range(4)]
        wait_for(lambda: post_raw(s.port, body)[0] == 503)  # once the server has read their heads
        refused = post_raw(s.port, body)
        assert refused[0] == 503 and json.loads(refused[1])["error"]["code"] == "busy"  # OpenAI's shape, as others
        for sock in busy:
            sock.close()
        wait_for(lambda: post_raw(s.port, body)[0] == 200)
    finally:
        s.stop()
    assert "concurrency" not in (tmp_path / "stderr.txt").read_text()  # no warning per refusal


def answer_status(sock: socket.socket) -> int | None:
    """The status of the answer on `sock`, or None where it was closed without one."""
    try:
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        reply.read()
        return reply.status
    except (ConnectionResetError, http.client.RemoteDisconnected):
        return None


def test_idle_connections_never_shut_a_request_out(ckpt, tmp_path):
    """Connections beyond --max-connections close those that have waited longest for a request (a client holding
    idle ones locked every other out, 503, until --head-timeout), never one with a request in flight, nor one
    whose request may not have been read yet (a burst of connections, each sending its request at once)."""
    from axiom.infer.serve import IDLE_BEFORE_CLOSED_S

    s = Server(ckpt, tmp_path / "stderr.txt", "--body-timeout", "3", "--max-connections", "4")
    body = json.dumps({"model": s.name, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    request = f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode()
    sockets: list[socket.socket] = []  # closed at the end, whatever fails
    try:
        for _ in range(3):
            burst = [socket.create_connection(("127.0.0.1", s.port), timeout=30) for _ in range(6)]
            sockets += burst
            for sock in burst:
                sock.sendall(request)
            statuses = [answer_status(sock) for sock in burst]
            assert None not in statuses and set(statuses) <= {200, 503}, statuses
            for sock in burst:
                sock.close()
        slow = trickled_body(s.port, body)
        sockets.append(slow)
        idle = []
        for _ in range(8):
            idle.append(socket.create_connection(("127.0.0.1", s.port), timeout=30))
            time.sleep(0.05)  # accepted in this order
        sockets += idle
        time.sleep(IDLE_BEFORE_CLOSED_S)  # younger ones may hold a request not read yet: they are not closed
        assert post_raw(s.port, body)[0] == 200
        for sock in idle[:6]:  # the four kept open: the slow one, the two newest idle ones and the request
            assert closed_by_server(sock) < 5
        for sock in idle[6:]:
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(1)
        reply = http.client.HTTPResponse(slow)
        reply.begin()
        assert reply.status == 408  # its request went on to its own end
    finally:
        for sock in sockets:
            sock.close()
        s.stop()


def closed_by_server(sock: socket.socket) -> float:
    """Seconds until the server closes `sock` (reads nothing more)."""
    start = time.monotonic()
    while sock.recv(4096):  # a response still arriving
        pass
    return time.monotonic() - start


def test_connections_without_a_whole_head_are_closed_after_head_timeout(ckpt, tmp_path):
    """A client holding connections that send nothing, or a head a byte at a time, or nothing after a response, has
    them closed after --head-timeout (uvicorn closes none of them: idle clients could hold every connection for
    ever)."""
    s = Server(ckpt, tmp_path / "stderr.txt", "--head-timeout", "2")
    body = json.dumps({"model": s.name, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    kept = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)  # HTTP/1.1: kept alive after its response
    opened = time.monotonic()  # before either connects: the server's timer of each starts later
    held = [socket.create_connection(("127.0.0.1", s.port), timeout=30) for _ in range(2)]
    try:
        kept.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        assert kept.getresponse().read() and kept.sock is not None
        held[1].sendall(b"POST /v1/completions HTTP/1.1\r\nHo")
        time.sleep(0.5)
        held[1].sendall(b"s")  # a byte more of the head does not buy time
        assert closed_by_server(held[0]) < 5 and time.monotonic() - opened > 1.9  # after the timeout, not before
        for sock in (kept.sock, held[1]):
            assert closed_by_server(sock) < 5  # the idle one opened first, so every wait is under the limit
        assert post_raw(s.port, body)[0] == 200
    finally:
        kept.close()
        for sock in held:
            sock.close()
        s.stop()


LOOP_SAID = (
    "-c",
    "import asyncio, sys\nimport uvicorn\n"
    "startup = uvicorn.Server.startup\n"
    "async def said(self, sockets=None):\n"
    "    print('event loop:', type(asyncio.get_running_loop()).__module__, file=sys.stderr, flush=True)\n"
    "    await startup(self, sockets)\n"
    "uvicorn.Server.startup = said\n"
    "from axiom.cli import main\n"
    "sys.exit(main())",
)  # `python -m axiom.cli`, saying on stderr the module of the event loop uvicorn runs


def test_sigterm_finishes_the_request_in_flight_then_exits(ckpt, tmp_path):
    """The request decoding goes on to its end; one whose body is still arriving is answered 503 at once (it held
    the shutdown for --body-timeout). On asyncio's event loop also where uvloop is installed (the dev extra installs
    it, as uvicorn[standard] does), which uvicorn would take: the shutdown is written against asyncio's server."""
    s = Server(ckpt, tmp_path / "stderr.txt", launcher=LOOP_SAID)
    sock, reader = raw_stream(s.port, {"model": s.name, "prompt": "Hello", "max_tokens": 1000, "temperature": 0})
    slow = trickled_body(s.port, json.dumps({"model": s.name, "prompt": "Hello"}))
    start = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    reply = http.client.HTTPResponse(slow)
    reply.begin()
    error = json.loads(reply.read())["error"]
    assert reply.status == 503 and (error["code"], error["message"]) == ("shutting_down", "the server is shutting down")
    assert time.monotonic() - start < 10  # not the 30 s of --body-timeout
    slow.close()

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
            return False
        except OSError:
            return True

    wait_for(refused, timeout=10)  # no new connections while the request in flight goes on
    events = [e.strip() for e in reader.read().split(b"\n\n") if e.strip()]
    sock.close()
    last, usage = (json.loads(e.removeprefix(b"data: ")) for e in events[-3:-1])
    assert events[-1] == b"data: [DONE]" and last["choices"][0]["finish_reason"] == "length"
    assert usage["usage"]["completion_tokens"] == 1000  # every token of the request, none cut off
    assert s.proc.wait(timeout=30) == 0
    assert "stopped after 1 requests" in s.proc.stdout.read()
    s.proc.stdout.close()
    assert "event loop: asyncio" in (tmp_path / "stderr.txt").read_text()


# `python -m axiom.cli` with asyncio.Server.wait_closed as Python 3.12 has it: it waits until every connection has
# closed (3.11's returns at once), and uvicorn's shutdown awaits it, also after a second Ctrl-C.
AS_PYTHON_3_12 = (
    "-c",
    "import asyncio, asyncio.base_events, sys\n"
    "async def wait_closed(self):\n"
    "    while self._active_count or self._sockets is not None:\n"
    "        await asyncio.sleep(0.05)\n"
    "asyncio.base_events.Server.wait_closed = wait_closed\n"
    "from axiom.cli import main\n"
    "sys.exit(main())",
)


@pytest.mark.parametrize("launcher", [("-m", "axiom.cli"), AS_PYTHON_3_12], ids=["here", "wait_closed_of_3_12"])
def test_a_second_ctrl_c_answers_what_still_decodes_and_exits(ckpt, tmp_path, launcher):
    """The first Ctrl-C waits for the requests in flight; a second answers them now: 503 `shutting_down` (JSON)
    to those not yet streaming, an error event and [DONE] to the one streaming, and exits 130 without a traceback
    (they were cancelled unanswered: plain-text 500s and uvicorn's "Exception in ASGI application" per request).
    Also where uvicorn's shutdown waits for the connections to close (Python 3.12 on): it waited for the requests'
    4,000 tokens."""
    s = Server(ckpt, tmp_path / "stderr.txt", "--max-batch", "1", launcher=launcher)
    body = {"model": s.name, "prompt": "Hello", "max_tokens": 4000, "temperature": 0}
    streaming = raw_stream(s.port, body)
    queued = [raw_stream(s.port, body, wait=False) for _ in range(3)]  # behind it: the status comes with a token
    try:
        s.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(timeout=30) == 130
        events = [e.strip() for e in streaming[1].read().split(b"\n\n") if e.strip()]
        error = json.loads(events[-3].removeprefix(b"data: "))
        assert error["error"]["code"] == "shutting_down" and events[-1] == b"data: [DONE]"
        for _, reader in queued:
            head, _, answer = reader.read().partition(b"\r\n\r\n")
            assert b" 503 " in head.split(b"\r\n")[0] and json.loads(answer)["error"]["code"] == "shutting_down"
    finally:
        for sock, _ in [streaming, *queued]:
            sock.close()
        s.stop()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and stderr.rstrip().endswith("axiom serve: interrupted"), stderr


async def job_events(service, job) -> list:
    """Submit `job` to an in-process Service and collect its events: (token, finish_reason) pairs up to the last,
    or one ApiError."""
    from axiom.infer.openai_api import ApiError

    service.submit(job)
    events = [await job.events.get()]
    while not isinstance(events[-1], ApiError) and events[-1][1] is None:
        events.append(await job.events.get())
    return events


def test_a_compiled_server_compiles_every_graph_before_its_first_request(ckpt, fresh_compiler):
    """With --compile, a request with top-k or top-p compiles nothing more (the engine thread would hold every
    stream in flight while it compiled): the start compiled the greedy step and each sampled cut-off."""
    from torch._dynamo.utils import counters

    from axiom.infer.engine import SamplingParams
    from axiom.infer.serve import Job, Service

    service = Service(load_model(ckpt)[0].eval(), "m", None, max_batch=2, max_queue=0, compile=True)
    service.start()
    compiled = counters["stats"]["unique_graphs"]

    async def main() -> list[list]:
        loop = asyncio.get_running_loop()
        kinds = [dict(temperature=0.0), dict(top_k=5), dict(top_p=0.5), dict(top_k=1000, top_p=0.9), {}]
        params = [SamplingParams(**{"max_new_tokens": 3, "temperature": 1.0, "seed": 1, **kind}) for kind in kinds]
        jobs = [Job([1, 2, 3], p, loop) for p in params]
        return [await job_events(service, job) for job in jobs]

    replies = asyncio.run(main())
    service.stop()
    assert all(len(events) == 3 and events[-1][1] == "length" for events in replies)
    assert counters["stats"]["unique_graphs"] == compiled


def test_a_failing_step_fails_the_requests_in_flight_and_the_engine_starts_afresh(ckpt):
    from axiom.infer.engine import SamplingParams
    from axiom.infer.serve import Job, Service

    model = load_model(ckpt)[0].eval()
    service = Service(model, "m", None, max_batch=2, max_queue=0, compile=False)
    broken = service.engine
    broken.step = lambda: 1 / 0
    service.start()

    async def main() -> tuple[list, list]:
        loop = asyncio.get_running_loop()
        failed = await job_events(service, Job([1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0), loop))
        served = await job_events(service, Job([1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0), loop))
        return failed, served

    failed, served = asyncio.run(main())
    service.stop()
    assert len(failed) == 1 and failed[0].status == 500 and "ZeroDivisionError" in failed[0].message
    assert service.engine is not broken and [t for t, _ in served] == generate(model, [[1, 2, 3]], 4, temperature=0)[0]
    assert served[-1][1] == "length" and service.stats()["accepted"] == 0


def test_bad_command_lines_are_one_line_errors(tmp_path, capsys):
    busy = socket.create_server(("127.0.0.1", 0))
    port = str(busy.getsockname()[1])
    long_label = "\u00fc" * 64  # an IDNA label holds 63 characters at most
    for args, message in [
        (["--ckpt", str(tmp_path), "--port", "0"], "checkpoint: "),
        (["--ckpt", str(tmp_path), "--port", port], f"--host 127.0.0.1 --port {port}: cannot listen"),
        (["--ckpt", str(tmp_path), "--max-batch", "0"], "--max-batch 0: must be at least 1"),
        (["--ckpt", str(tmp_path), "--max-connections", "0"], "--max-connections 0: must be at least 1"),
        (["--ckpt", str(tmp_path), "--head-timeout", "inf"], "--head-timeout inf: must be a positive number"),
        (["--ckpt", str(tmp_path), "--body-timeout", "nan"], "--body-timeout nan: must be a positive number"),
        (["--ckpt", str(tmp_path), "--body-timeout", "0"], "--body-timeout 0.0: must be a positive number"),
        # each was a traceback (OverflowError from bind) or argparse's usage block
        (
            ["--ckpt", str(tmp_path), "--port", "70000"],
            "--port 70000: expected a port number from 0 to 65535 (0: any free port)\n",
        ),
        (["--ckpt", str(tmp_path), "--port=-1"], "--port -1: expected a port number"),
        (["--ckpt", str(tmp_path), "--port", "http"], "--port http: expected a port number"),
        (
            ["--ckpt", str(tmp_path), "--host", "", "--port", "0"],
            "--host '': empty; 127.0.0.1 listens on this machine only, 0.0.0.0 on every interface\n",
        ),
        (["--ckpt", str(tmp_path), "--host", "no such host.invalid", "--port", "0"], "--host no such host.invalid"),
        (["--ckpt", str(tmp_path), "--host", "127.0.0.1\x00", "--port", "0"], "--host '127.0.0.1\\x00' --port 0"),
        # names socket cannot encode (a byte that is not UTF-8, an IDNA label over 63 characters) were TypeErrors
        (
            ["--ckpt", str(tmp_path), "--host", "h\udcff", "--port", "0"],
            "--host 'h\\udcff' --port 0: cannot listen (encoding of hostname failed); try another --host or --port\n",
        ),
        (
            ["--ckpt", str(tmp_path), "--host", long_label, "--port", "0"],
            f"--host {long_label} --port 0: cannot listen",
        ),
        (["--ckpt", str(tmp_path), "--port", "9" * 5000], "--port 999"),
        (["--ckpt", str(tmp_path), "--host", "localhost:8000", "--port", "0"], "--host localhost:8000"),
        (["--ckpt", str(tmp_path), "--port", "0", "--allow-host", "a\x00"], "--allow-host 'a\\x00': expected a host"),
        (["--ckpt", str(tmp_path), "--port", "0", "--allow-host", ":80"], "--allow-host :80: expected a host name"),
        (
            ["--ckpt", str(tmp_path), "--host", "0.0.0.0", "--port", "0", "--allow-host", "chat.example.org"],
            "--allow-host chat.example.org: --host 0.0.0.0 answers every name already",
        ),
        # a name from a folder that is not UTF-8 made /v1/models a 500 for every client
        (["--ckpt", str(tmp_path), "--port", "0", "--model-name", "bad\udcffname"], "model name 'bad\\udcffname'"),
    ]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            assert main(["serve", *args]) == 2
            gc.collect()
        err = capsys.readouterr().err
        assert err.startswith(f"axiom serve: error: {message}") and err.count("\n") == 1
        # a refusal after the socket was bound closes it (it was left to the garbage collector)
        assert not [w for w in caught if "socket" in str(w.message)], args
    busy.close()


def test_a_row_that_fails_fails_its_request_alone(ckpt):
    """Non-finite logits in one row (here a NaN embedding that one prompt reads) fail that request with a 500; the
    stream beside it decodes on in the same engine and gives the tokens it gives alone. (A failing step, above,
    still restarts the engine: it cannot be pinned on one row.)"""
    from axiom.infer.engine import SamplingParams
    from axiom.infer.serve import Job, Service

    model = load_model(ckpt)[0].eval()
    normal_prompt, poison = [1, 2, 3], 50000
    expected = generate(model, [normal_prompt], 40, temperature=0)[0]
    assert poison not in normal_prompt + expected
    with torch.no_grad():
        model.embed.weight[poison] = float("nan")
    service = Service(model, "m", False, max_batch=4, max_queue=0, compile=False)
    engine = service.engine
    service.start()

    async def main() -> tuple[list, list, list]:
        loop = asyncio.get_running_loop()
        normal = asyncio.ensure_future(job_events(service, Job(normal_prompt, SamplingParams(40, temperature=0), loop)))
        await asyncio.sleep(0.05)  # the normal request is decoding when the others join its batch
        sampled = await job_events(service, Job([7, poison, 8], SamplingParams(40, temperature=0.9, seed=1), loop))
        greedy = await job_events(service, Job([poison], SamplingParams(40, temperature=0), loop))
        return await normal, sampled, greedy

    normal, *failed = asyncio.run(main())
    service.stop()
    line = "decoding failed: the model's logits are not finite (NaN or inf) for this prompt"
    assert all(len(f) == 1 and (f[0].status, f[0].message) == (500, line) for f in failed)
    assert [t for t, _ in normal] == expected and normal[-1][1] == "length"
    assert service.engine is engine and service.stats()["accepted"] == 0  # no restart


def test_a_row_that_fails_after_its_stream_started_ends_the_stream_with_the_error(ckpt):
    """A row whose logits turn non-finite after some tokens (here the third token it chooses has a NaN embedding,
    read in the next step): its stream, whose 200 was sent with the first token, carries the error as its last event
    and then `[DONE]`; not streamed, the same request is a 500 with that message."""
    from axiom.infer.serve import Service

    model = load_model(ckpt)[0].eval()
    prompt = [7, 8, 9]
    chosen = generate(model, [prompt], 3, temperature=0)[0]
    assert chosen[2] not in prompt + chosen[:2]
    with torch.no_grad():
        model.embed.weight[chosen[2]] = float("nan")
    line = "decoding failed: the model's logits are not finite (NaN or inf) for this prompt"
    with serving(Service(model, "m", False, max_batch=2, max_queue=0, compile=False)) as port:
        body = {"model": "m", "prompt": prompt, "max_tokens": 20, "temperature": 0}
        status, raw = post_raw(port, json.dumps({**body, "stream": True}))
        assert status == 200
        *chunks, error, done = [e.strip() for e in raw.split(b"\n\n") if e.strip()]
        assert done == b"data: [DONE]" and json.loads(error.removeprefix(b"data: "))["error"]["message"] == line
        text = "".join(json.loads(c.removeprefix(b"data: "))["choices"][0]["text"] for c in chunks)
        whole = b"".join(token_bytes(load_tokenizer(), t) for t in chosen).decode(errors="replace")
        assert chunks and whole.startswith(text)  # what came before the failing step
        status, raw = post_raw(port, json.dumps(body))
        assert (status, json.loads(raw)["error"]["message"]) == (500, line)


def read_events(reader) -> tuple[str, list[dict]]:
    """The text and the events of a raw completion stream, read to its end."""
    events = [e.strip() for e in reader.read().split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")), chunks


HOSTILE_NUMBERS = [  # numbers that pass as JSON numbers but break the maths, or are not JSON numbers at all; the
    # status, and for some the error's message
    ('"temperature": 1e-45', 200),  # greedy: below the floor (was inf / NaN probabilities and a failed step)
    ('"temperature": 1e-50, "stream": true', 200),
    # 1e400: inf, as Python reads it
    ('"temperature": 1e400', 400, "temperature: must be 0 (greedy) or positive and finite, not inf"),
    ('"temperature": Infinity', 400),  # not JSON
    ('"temperature": NaN', 400),
    ('"temperature": -0.0', 200),
    ('"temperature": 1e300', 200),  # finite: a uniform draw
    ('"seed": 18446744073709551615, "temperature": 1', 200),
    ('"seed": -9223372036854775808, "temperature": 1', 200),
    (
        '"seed": 18446744073709551616, "temperature": 1',
        400,
        "seed: must fit in 64 bits (-2**63 to 2**64 - 1), not 18446744073709551616",
    ),
    ('"top_p": 1e-300, "temperature": 1', 200),
    ('"top_k": 1000000000000000000000000000000, "temperature": 1', 200),
    ('"top_k": -1, "temperature": 1', 200),  # none, as vLLM clients send it
    ('"top_k": -2, "temperature": 1', 400),
    ('"max_tokens": ' + "9" * 5000, 400),
    ('"seed": ' + "9" * 5000, 400),
    ('"temperature": ' + "9" * 400, 400),  # an integer no float can hold
]


def post_raw(port: int, body: bytes | str, headers: dict | None = None) -> tuple[int, bytes]:
    """POST /v1/completions as given (no JSON round trip): the status and the raw answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=body, headers=headers or {"Content-Type": "application/json"})
    response = conn.getresponse()
    status, data = response.status, response.read()
    conn.close()
    return status, data


def test_hostile_numbers_beside_a_normal_stream(server):
    """A normal stream decodes while every hostile request above is answered: its text equals what it gives alone,
    and each hostile request gets its answer (greedy, a seeded draw, or a 400), never a 500."""
    normal = {"model": server.name, "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0}
    alone = server.client.completions.create(**normal).choices[0].text
    sock, reader = raw_stream(server.port, normal, wait=False)
    assert b" 200 " in reader.readline()
    while reader.readline().strip():  # the headers
        pass
    first = json.loads(reader.readline().removeprefix(b"data: "))  # the first token's event: it is decoding
    for fields, status, *message in HOSTILE_NUMBERS:  # a later "max_tokens" replaces the first
        got, data = post_raw(server.port, f'{{"model": "{server.name}", "prompt": "Hello", "max_tokens": 8, {fields}}}')
        assert got == status, (fields, data[:300])
        if status == 400:
            assert json.loads(data)["error"]["type"] == "invalid_request_error"
            assert [json.loads(data)["error"]["message"]] == message or not message
    assert server.http("GET", "/health")[1]["running"] == 1  # the normal stream is still decoding
    text, _ = read_events(reader)
    sock.close()
    assert first["choices"][0]["text"] + text == alone


@pytest.mark.parametrize(
    "field, value",
    [
        ("logit_bias", {"1000": 100}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
        ("repetition_penalty", 1.2),
        ("response_format", {"type": "json_object"}),
        ("logprobs", 0),  # completions: the chosen tokens' logprobs
        ("logprobs", True),
        ("top_logprobs", 2),
        ("n", 2),
        ("n", True),  # not the number 1
        ("best_of", 3),
        ("echo", True),
        ("suffix", "end"),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "required"),
        ("min_tokens", 5),
    ],
)
def test_fields_that_would_change_the_answer_are_refused_by_name(server, field, value):
    status, data = server.http(
        "POST", "/v1/completions", json.dumps({"model": server.name, "prompt": "hi", field: value})
    )
    assert status == 400 and data["error"]["param"] == field and "not supported" in data["error"]["message"]


def test_neutral_values_of_unsupported_fields_and_harmless_fields_pass(server):
    neutral = {
        "n": 1,
        "best_of": 1,
        "echo": False,
        "logprobs": None,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
        "user": "someone",
    }
    body = {"model": server.name, "prompt": "Hello world", "max_tokens": 6, "temperature": 0}
    plain = server.http("POST", "/v1/completions", json.dumps(body))[1]["choices"][0]["text"]
    status, data = server.http("POST", "/v1/completions", json.dumps({**body, **neutral}))
    assert status == 200 and data["choices"][0]["text"] == plain


def test_request_size_limits(server):
    """A body over 1 MiB is refused at once, by its Content-Length before any of it is read, or as it arrives
    when chunked; stop strings and messages are bounded; only JSON is read."""
    from axiom.infer.openai_api import MAX_BODY_BYTES

    start = time.monotonic()
    big = json.dumps({"model": server.name, "prompt": "x" * MAX_BODY_BYTES})
    status, data = post_raw(server.port, big)
    assert status == 413 and json.loads(data)["error"]["code"] == "body_too_large"
    assert json.loads(data)["error"]["message"] == "the body exceeds 1,048,576 bytes"
    # A declared 64 GiB: answered without a byte of the body sent.
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
    sock.sendall(b"Content-Length: 68719476736\r\n\r\n")
    assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 413 ")
    sock.close()
    # Chunked, with no length declared: refused once the bytes received pass the limit.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    chunks = (b"x" * 65536 for _ in range(64))  # 4 MiB
    conn.request("POST", "/v1/completions", body=chunks, headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 413
    conn.close()
    assert time.monotonic() - start < 10
    # Stop strings of 100,000 characters: each would cost every token its length
    status, data = post_raw(server.port, json.dumps({"model": server.name, "prompt": "hi", "stop": ["x" * 100_000]}))
    stop = "stop: expected up to 4 non-empty strings of at most 256 characters"
    assert status == 400 and json.loads(data)["error"]["message"] == stop
    # Only JSON: curl -d sends a form type unless told otherwise; a missing type is taken as JSON.
    ok = json.dumps({"model": server.name, "prompt": "hi", "max_tokens": 2})
    status, data = post_raw(server.port, ok, {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and json.loads(data)["error"]["code"] == "unsupported_media_type"
    assert post_raw(server.port, ok, {"Content-Type": "application/json; charset=utf-8"})[0] == 200
    status, data = post_raw(server.port, ok, {"Content-Type": "application/json; charset=latin-1"})  # not read as such
    assert status == 415 and "the body must be JSON in UTF-8" in json.loads(data)["error"]["message"]
    assert post_raw(server.port, ok, {})[0] == 200
    assert server.http("GET", "/health")[0] == 200


def test_messages_are_bounded_before_they_are_tokenized():
    from axiom.infer.openai_api import ApiError, ServedModel, check_request

    model = ServedModel("m", context=64, chat=True)
    check_request({"model": "m", "messages": [{"role": "user", "content": "hi"}] * 3}, model, chat=True)
    with pytest.raises(ApiError) as e:  # 16 messages take at least 64 tokens: refused without tokenizing them
        check_request({"model": "m", "messages": [{"role": "user", "content": "x" * 100_000}] * 16}, model, chat=True)
    assert (e.value.param, e.value.code) == ("messages", "context_length_exceeded")
    assert "16 messages take at least 4 tokens each" in e.value.message


def test_chat_fields_are_checked_whichever_is_read():
    """max_tokens is type-checked beside max_completion_tokens, an error names the field that holds the value, and a
    message field other than role and content is refused, not dropped."""
    from axiom.infer.openai_api import ApiError, ServedModel, check_request

    model, hi = ServedModel("m", context=256, chat=True), [{"role": "user", "content": "hi"}]
    for extra, param, message in [
        ({"max_completion_tokens": 2, "max_tokens": "abc"}, "max_tokens", "max_tokens: expected int"),
        ({"max_completion_tokens": None, "max_tokens": 0}, "max_tokens", "max_tokens: must be at least 1"),
        ({"messages": [{**hi[0], "name": "bob"}]}, "messages", "messages[0].name: not supported by axiom serve"),
    ]:
        with pytest.raises(ApiError) as e:
            check_request({"model": "m", "messages": hi, **extra}, model, True)
        assert (e.value.status, e.value.param) == (400, param) and e.value.message.startswith(message)
    assert check_request({"model": "m", "messages": [{**hi[0], "name": None}], "max_tokens": 3}, model, True)
    for extra, message in [  # on /v1/completions, the lines the row shows
        ({"presence_penalty": 0.5}, "presence_penalty: not supported by axiom serve (leave it out, or 0)"),
        (
            {"temprature": 0},
            "unrecognized request argument 'temprature'; /v1/completions takes max_tokens, model, prompt, seed, "
            "stop, stream, stream_options, temperature, top_k, top_p, user",
        ),
    ]:
        with pytest.raises(ApiError) as e:
            check_request({"model": "m", "prompt": "hi", **extra}, ServedModel("m", context=256, chat=False), False)
        assert e.value.message == message


def test_chat_content_may_be_a_list_of_text_parts():
    """OpenAI's clients may send a message's content as parts: text parts are joined by newlines (as vLLM does),
    giving the prompt of the joined string; any other part is refused by name."""
    from axiom.infer.openai_api import ApiError, ServedModel, check_request

    model = ServedModel("m", context=256, chat=True)

    def prompt(content) -> list[int]:
        return check_request({"model": "m", "messages": [{"role": "user", "content": content}]}, model, True).prompt

    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there!"}]
    assert prompt(parts) == prompt("Hello\nthere!") and prompt(parts[:1]) == prompt("Hello")
    for content, message in [
        ([], "messages[0].content: an empty list of parts"),
        ([parts[0], {"type": "image_url", "image_url": {}}], "messages[0].content[1]: type 'image_url' is not"),
        (["Hello"], "messages[0].content[0]: expected {'type': 'text', 'text': string}"),
        ([{"type": "text", "text": 5}], "messages[0].content[0]: expected"),
        (5, "messages[0]: expected {'role': string, 'content': string or list of text parts}"),
    ]:
        with pytest.raises(ApiError) as e:
            prompt(content)
        assert e.value.status == 400 and e.value.param == "messages" and e.value.message.startswith(message)


def test_request_checking_runs_off_the_event_loop(ckpt, monkeypatch):
    """Parsing and tokenizing a large body take a while; on the event loop they held up every stream and /health.
    Here checking a 1 MiB prompt (legal in size, too long for the context) takes 3 s more, and /health still answers
    at once meanwhile."""
    import axiom.infer.serve as serve

    real = serve.check_request

    def slow_check(*args):
        time.sleep(3)
        return real(*args)

    monkeypatch.setattr(serve, "check_request", slow_check)
    service = serve.Service(load_model(ckpt)[0].eval(), "m", False, max_batch=1, max_queue=0, compile=False)
    with serving(service) as port:
        answers = []
        big = json.dumps({"model": "m", "prompt": "word " * 200_000})
        slow = threading.Thread(target=lambda: answers.append(post_raw(port, big)))
        slow.start()
        time.sleep(0.5)  # the slow request is being checked
        start = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200 and time.monotonic() - start < 1.5
        conn.close()
        slow.join()
        ((status, data),) = answers
        assert status == 400 and json.loads(data)["error"]["code"] == "context_length_exceeded"


def test_the_model_is_named_after_its_checkpoint_not_its_path(server, ckpt, tmp_path):
    from axiom.cli.serve import model_name

    assert server.name == ckpt.name  # the folder's name, however --ckpt was spelt
    assert [m.id for m in server.client.models.list().data] == [ckpt.name]
    status, data = server.http("POST", "/v1/completions", json.dumps({"model": str(ckpt), "prompt": "hi"}))
    assert status == 404 and data["error"]["code"] == "model_not_found"
    run = tmp_path / "axiom-380m"
    (run / "checkpoints" / "step_000400").mkdir(parents=True)
    (tmp_path / "link").symlink_to(run / "checkpoints" / "step_000400")
    assert model_name(str(run / "checkpoints" / "step_000400")) == "axiom-380m-step_000400"
    assert model_name(str(tmp_path / "link")) == "axiom-380m-step_000400"
    assert model_name(str(run / "checkpoints" / "best") + "/") == "axiom-380m-best"


@pytest.mark.slow
def test_load_with_hostile_requests_mixed_in(ckpt):
    """scripts/load_test.py, bounded: 4 clients stream greedy completions while 26 hostile requests (two of each
    kind) arrive beside them; every stream gives its prompt's text decoded alone, every hostile request its own
    answer (the script exits 1 otherwise). Run from elsewhere, with the checkpoint's path relative to there."""
    cmd = [sys.executable, str(ROOT / "scripts" / "load_test.py"), "--ckpt", ckpt.name, "--concurrency", "4"]
    cmd += ["--requests", "6", "--max-tokens", "16", "--rounds", "1", "--hostile", "26", "--no-baseline", "--json"]
    done = subprocess.run(cmd, cwd=ckpt.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    (level,) = report["levels"]
    assert report["hostile_per_level"] == 26 and report["min_greedy_margin"] > 1e-5
    batched = level["servers"]["batched"]
    assert batched["completed"] == 24 and batched["errors"] == 0
    # streamed: each request's first text arrives before its end, and tokens come in steps between
    assert 0 < batched["ttft_p50_s"] <= batched["ttft_p95_s"] <= batched["p95_s"]
    assert 0 < batched["itl_p50_s"] <= batched["itl_p95_s"] < batched["p95_s"]


def test_load_test_on_a_model_of_another_vocabulary_is_one_line(tmp_path):
    """Its reference texts went through `generate`, whose ValueError ended the script in a traceback. Said before
    the model is readied: a decode-kernel build running in another process printed its notice first."""
    cfg = get_config("tiny", [*MICRO, "vocab_size=512"])
    save_model(Axiom(cfg.model), cfg, tmp_path, step=0)
    cmd = [sys.executable, str(ROOT / "scripts" / "load_test.py"), "--ckpt", str(tmp_path), "--no-baseline"]
    done = subprocess.run([*cmd, "--rounds", "1", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "is outside the model's vocab_size 512: use a model with cl100k_base's 100,277 ids" in done.stderr


def load_test_script(monkeypatch):
    """scripts/load_test.py as a module."""
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "scripts" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "load_test", load_test)
    spec.loader.exec_module(load_test)
    return load_test


@pytest.mark.parametrize(
    "misbehaves, error",
    [
        (None, None),
        ("a hostile request gets a 500", "hostile temperature 1e-45: got 500, not 200"),
        ("a stream's text differs", "'The history of the city begins': text differs from the prompt decoded alone"),
    ],
    ids=["as_it_must", "hostile_500", "text_differs"],
)
def test_load_test_exits_1_when_the_server_misbehaves(misbehaves, error, monkeypatch, tmp_path, capsys):
    """`--hostile` fails the run for a hostile request answered otherwise than it must be, or a normal stream whose
    text is not its prompt's decoded alone; here against a stub of axiom serve that does one or the other."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    load_test = load_test_script(monkeypatch)
    text = "wrong" if misbehaves == "a stream's text differs" else "right"

    class Stub(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = json.loads(body) if body.startswith(b"{") else {}
            if request.get("temperature") != 0:  # the hostile request: temperature 1e-45, a greedy 200 from axiom
                self.answer(500 if misbehaves == "a hostile request gets a 500" else 200, b"{}")
            elif request.get("stream"):
                chunks = [{"choices": [{"text": text}]}, {"choices": [], "usage": {"completion_tokens": 1}}]
                events = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
                self.answer(200, events.encode())
            else:  # the warm-up
                self.answer(200, json.dumps({"choices": [{"text": text}], "usage": {"completion_tokens": 1}}).encode())

        def answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    stub = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=stub.serve_forever, args=(0.01,), daemon=True).start()
    monkeypatch.setattr(load_test, "expected_texts", lambda ckpt, args: (dict.fromkeys(load_test.PROMPTS, "right"), 1))
    monkeypatch.setattr(
        load_test, "start_axiom_serve", lambda ckpt, batch, args: load_test.Server(None, stub.server_port)
    )
    monkeypatch.setattr(load_test.Server, "stop", lambda self: None)
    argv = ["load_test.py", "--ckpt", str(tmp_path), "--concurrency", "1", "--requests", "1", "--rounds", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--hostile", "1", "--no-baseline", "--json"])
    try:
        code = load_test.main()
    finally:
        stub.shutdown()
        stub.server_close()
    batched = json.loads(capsys.readouterr().out)["levels"][0]["servers"]["batched"]
    assert (code, batched["error_samples"]) == ((1, [error]) if error else (0, []))


@pytest.mark.slow
def test_load_test_percentiles_are_nearest_rank(monkeypatch):
    """The p50 of 1..4 was 3 and the p95 of 1..20 the maximum, one rank too high."""
    load_test = load_test_script(monkeypatch)
    assert load_test.percentile([4, 1, 3, 2], 0.5) == 2
    assert load_test.percentile(list(range(1, 21)), 0.95) == 19
    assert load_test.percentile([7.0], 0.95) == 7.0 and load_test.percentile([], 0.5) is None


def test_load_compared_with_transformers_serve(ckpt, monkeypatch):
    """scripts/load_test.py --vs-transformers-serve, bounded: 2 clients stream greedy completions from axiom serve
    and from `transformers serve --continuous-batching` on a Llama export of the same weights, in the same round;
    both get throughput and latency figures, the ratio is reported, and transformers' texts are compared with the
    prompt decoded alone by axiom (counted, not required)."""
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "scripts" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "load_test", load_test)  # its dataclasses look their module up there
    spec.loader.exec_module(load_test)
    if missing := load_test.transformers_serve_missing():
        pytest.skip(f"transformers serve cannot run here: {missing}")
    cmd = [sys.executable, "scripts/load_test.py", "--ckpt", str(ckpt), "--concurrency", "2", "--requests", "2"]
    cmd += ["--max-tokens", "8", "--rounds", "1", "--stream", "--no-baseline", "--vs-transformers-serve", "--json"]
    # a short warm-up: on a CPU transformers' continuous batching warms up at the largest batch it infers from memory
    cmd += ["--transformers-serve-args=--cb-max-batch-tokens 256 --cb-num-blocks 64"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    (level,) = report["levels"]
    assert report["transformers"] and set(level["servers"]) == {"batched", "transformers_serve"}
    for name, server in level["servers"].items():
        assert server["completed"] == 4 and server["errors"] == 0, name
        assert server["tokens_per_s"] > 0 and 0 < server["p50_s"] <= server["p95_s"], name
        assert 0 < server["ttft_p50_s"] <= server["ttft_p95_s"] <= server["p95_s"], name
        assert 0 < server["itl_p50_s"] <= server["itl_p95_s"] < server["p95_s"], name
    assert level["servers"]["batched"]["same_text"] == 4  # axiom's must equal the reference
    assert 0 <= level["servers"]["transformers_serve"]["same_text"] <= 4  # transformers' were compared, and counted
    assert level["axiom_vs_transformers"] > 0
