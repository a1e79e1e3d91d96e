"""`axiom serve`: the OpenAI API (completions, chat completions, models) over the decoding engine.

    HTTP handlers (asyncio, uvicorn)            engine thread
    parse + check the request  ──submit──▶  inbox ─▶ Engine.step() in a loop: continuous batching
    text, stop strings, SSE   ◀──tokens──   (one token per running request per step)

One thread owns the `Engine` (axiom/engine.py) and does all decoding; handlers only talk to it through its inbox
(submit, cancel) and receive tokens on their own asyncio queue. At most `max_batch` requests decode at once and
`max_queue` more wait; beyond that a request is answered 503 at once. A client that disconnects cancels its
request at the next token boundary, freeing its slot. SIGTERM stops accepting connections, lets the requests in
flight finish, then exits 0 (Ctrl-C does the same and exits 130). Errors are JSON in the OpenAI shape, and nothing
a client sends can stop the server: a failing step fails the requests in flight (500) and the engine starts afresh.

Starlette and uvicorn (the `serve` extra) are imported only when the server starts. Requests are checked by hand
rather than through FastAPI's pydantic models, so that every error has OpenAI's shape and status.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import json
import logging
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from axiom.cli.args import add_inference_arguments
from axiom.errors import AxiomError
from axiom.infer.engine import Engine, Request, SamplingParams
from axiom.infer.fast import load_for_inference
from axiom.model.transformer import Axiom
from axiom.text.chatml import IM_END, encode_chat
from axiom.text.stream import token_bytes
from axiom.text.tokenizer import load_tokenizer

log = logging.getLogger("axiom.infer.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint directory to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    parser.add_argument("--model-name", help="the model id clients send and /v1/models lists (default: --ckpt)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default: 8)")
    parser.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for a slot before 503 answers (default: 64)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode with a static cache and a torch.compile'd step (CUDA graphs on a GPU); compiles at start",
    )
    add_inference_arguments(parser)


def run(args: argparse.Namespace) -> None:
    if args.max_batch < 1:
        raise AxiomError(f"--max-batch {args.max_batch}: must be at least 1")
    if args.max_queue < 0:
        raise AxiomError(f"--max-queue {args.max_queue}: must be 0 or more")
    try:
        import uvicorn
    except ImportError:
        raise AxiomError("axiom serve needs the serve extra: pip install 'axiom-lm[serve]'") from None
    # Bound before the model loads, so that a port in use is said at once; connections wait in the backlog.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        sock = socket.create_server((args.host, args.port), family=family)
    except OSError as e:  # in use, not an address of this machine, a privileged port
        why = e.strerror or e
        raise AxiomError(f"--host {args.host} --port {args.port}: cannot listen ({why}); try another --port") from None
    model, meta = load_for_inference(args.ckpt, args.device, args.dtype)
    name = args.model_name or args.ckpt
    service = Service(model, name, meta.get("chat_template"), args.max_batch, args.max_queue, args.compile)
    host, port = sock.getsockname()[:2]
    logging.basicConfig(level=logging.INFO, format="axiom serve: %(message)s", stream=sys.stderr)
    config = uvicorn.Config(build_app(service), log_level="warning", timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    service.start()  # with --compile, after compiling
    # uvicorn re-raises the signal it shut down for once it is done; with this handler that ends in a return.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"axiom serve: {name} on http://{host}:{port}/v1 (max batch {args.max_batch})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        service.stop()
    print(f"axiom serve: stopped after {service.finished} requests", flush=True)


# ---- errors


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = "invalid_request_error" if status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- the engine thread


@dataclass(eq=False)
class Job:
    """One HTTP request's decoding: the engine thread posts (token, finish_reason) pairs, or an ApiError, to
    `events` on the handler's event loop."""

    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    request: Request | None = None

    def post(self, event) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _deliver(events: list[tuple[Job, object]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)


class Service:
    """The engine, the thread that drives it, and the bookkeeping the handlers need (capacity, chat)."""

    def __init__(
        self, model: Axiom, name: str, chat_template: str | None, max_batch: int, max_queue: int, compile: bool
    ):
        self.model, self.name, self.chat_template = model, name, chat_template
        self.max_batch, self.compile = max_batch, compile
        self.capacity = max_batch + max_queue
        self.context = model.cfg.max_seq_len
        self.engine = Engine(model, max_batch=max_batch, compile=compile)
        self.finished = 0
        self._inbox: queue.SimpleQueue[tuple[str, Job]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._accepted = 0  # submitted and not yet finished
        self._jobs: dict[int, Job] = {}
        self._stopping = False
        self._ready = threading.Event()
        self._warm_up_error: Exception | None = None
        self._thread = threading.Thread(target=self._loop, name="axiom-engine", daemon=True)

    def start(self) -> None:
        """Start the engine thread; with `compile`, return once it has compiled its steps (in that thread: CUDA
        graphs are recorded per thread)."""
        self._thread.start()
        self._ready.wait()
        if self._warm_up_error is not None:
            raise self._warm_up_error

    def _warm_up(self) -> None:
        for temperature in (0.0, 1.0):  # the greedy step and the one that returns logits
            request = self.engine.submit([0], SamplingParams(max_new_tokens=3, temperature=temperature))
            while not request.done:
                self.engine.step()

    def stop(self) -> None:
        """Let the engine finish what it holds, then end its thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def stats(self) -> dict:
        return {"running": len(self.engine.running), "waiting": len(self.engine.waiting), "accepted": self._accepted}

    def submit(self, job: Job) -> None:
        """Hand a job to the engine thread; 503 when max_batch + max_queue requests are already accepted."""
        with self._lock:
            if self._accepted >= self.capacity:
                raise ApiError(503, "the server is busy: all slots and the queue are full; retry later", code="busy")
            self._accepted += 1
        self._inbox.put(("submit", job))
        self._wake.set()

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))
        self._wake.set()

    def _loop(self) -> None:
        try:
            if self.compile:
                self._warm_up()
        except Exception as e:
            self._warm_up_error = e
            return
        finally:
            self._ready.set()
        while True:
            try:
                self._drain_inbox()
                if not self.engine.has_work():
                    if self._stopping:
                        return
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._step()
            except Exception as e:  # a bug or the device failing: fail what is in flight, keep serving
                log.exception("decoding failed")
                self._restart(ApiError(500, f"decoding failed ({type(e).__name__}: {e})"))

    def _step(self) -> None:
        produced = self.engine.step()
        # One wake-up of each event loop per step, not one per token: each wake-up is a write to a pipe.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, tuple[int, str | None]]]] = {}
        for request, token in produced:
            job = self._jobs[request.id]
            by_loop.setdefault(job.loop, []).append((job, (token, request.finish_reason)))
            if request.done:
                self._finish(job)
        for loop, events in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, events)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                try:
                    job.request = self.engine.submit(job.prompt, job.params)
                except Exception as e:  # the handler checked the request; kept so that no job is ever lost
                    job.post(ApiError(400 if isinstance(e, ValueError) else 500, str(e)))
                    self._finish(job)
                    continue
                self._jobs[job.request.id] = job
            elif job.request is not None and not job.request.done:
                self.engine.cancel(job.request)
                log.info("request %d cancelled after %d tokens", job.request.id, len(job.request.tokens))
                self._finish(job)

    def _finish(self, job: Job) -> None:
        if job.request is not None:
            self._jobs.pop(job.request.id, None)
        with self._lock:
            self._accepted -= 1
            self.finished += 1

    def _restart(self, error: ApiError) -> None:
        """Fail every request the engine holds and start a fresh engine (a failed step may leave it half-done)."""
        for job in list(self._jobs.values()):
            job.request.finish_reason = "error"  # a later cancel of it is a no-op
            job.post(error)
            self._finish(job)
        self.engine = Engine(self.model, max_batch=self.max_batch, compile=self.compile)


# ---- request checking


def _get(body: dict, name: str, kinds: tuple[type, ...], default=None, what: str = ""):
    """body[name] if it has one of `kinds` (bool is not a number here), `default` if absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"{name}: expected {what or ' or '.join(k.__name__ for k in kinds)}", param=name)
    return value


@dataclass
class Spec:
    """A checked request: what to decode and how to answer."""

    prompt: list[int]
    params: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool


def check_request(body: dict, service: Service, chat: bool) -> Spec:
    """Check `body` of /v1/completions or /v1/chat/completions; ApiError (400/404) naming the bad field."""
    model = _get(body, "model", (str,))
    if model is None:
        raise ApiError(400, "model: required; GET /v1/models lists it", param="model")
    if model != service.name:
        message = f"the model {model!r} does not exist; this server has {service.name!r}"
        raise ApiError(404, message, "model", "model_not_found")
    enc = load_tokenizer()
    stop_ids = [enc.eot_token]
    if chat:
        prompt, stop_ids = _chat_prompt(body, service, stop_ids), [*stop_ids, *_chat_stop_ids()]
        max_tokens = _get(body, "max_completion_tokens", (int,))
        max_tokens = _get(body, "max_tokens", (int,)) if max_tokens is None else max_tokens
        param = "messages"
    else:
        prompt = _completion_prompt(body, enc)
        max_tokens = _get(body, "max_tokens", (int,), default=16)  # OpenAI's default for completions
        param = "prompt"
    if len(prompt) >= service.context:
        raise ApiError(
            400,
            f"this model's context is {service.context} tokens and the prompt has {len(prompt)}; a prompt must "
            "leave room for at least one new token",
            param,
            "context_length_exceeded",
        )
    room = service.context - len(prompt)
    if max_tokens is not None and max_tokens <= 0:
        name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        raise ApiError(400, f"{name}: must be at least 1, not {max_tokens}", param=name)
    if _get(body, "n", (int,), default=1) != 1:
        raise ApiError(400, "n: only 1 choice per request is supported", param="n")
    for unsupported in ("echo", "logprobs", "suffix", "tools", "functions"):
        if body.get(unsupported) not in (None, False, 0, []):
            raise ApiError(400, f"{unsupported}: not supported by axiom serve", param=unsupported)
    params = SamplingParams(
        max_new_tokens=min(max_tokens or room, room),  # within the context: finish_reason "length" at its end
        temperature=float(_get(body, "temperature", (int, float), default=1.0, what="a number")),
        top_p=_get(body, "top_p", (int, float), what="a number"),
        top_k=_get(body, "top_k", (int,)),
        seed=_get(body, "seed", (int,)),
        stop_ids=tuple(stop_ids),
    )
    if params.seed is not None and not -(2**63) <= params.seed < 2**64:
        raise ApiError(400, "seed: must fit in 64 bits", param="seed")
    problem = params.problem()
    if problem:
        name = {"max_new_tokens": "max_tokens"}.get(problem[0], problem[0])
        raise ApiError(400, f"{name}: {problem[1]}, not {getattr(params, problem[0])}", param=name)
    stop = _get(body, "stop", (str, list), default=[], what="a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop: expected up to 4 non-empty strings", param="stop")
    options = _get(body, "stream_options", (dict,), default={})
    return Spec(
        prompt,
        params,
        stop,
        stream=_get(body, "stream", (bool,), default=False),
        include_usage=_get(options, "include_usage", (bool,), default=False),
    )


def _completion_prompt(body: dict, enc) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return enc.encode_ordinary(prompt) if prompt else [enc.eot_token]  # as `axiom generate` does
    if isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < enc.n_vocab for t in prompt):
        return prompt
    raise ApiError(400, "prompt: expected a string or a non-empty list of token ids (one prompt per request)", "prompt")


def _chat_prompt(body: dict, service: Service, stop_ids: list[int]) -> list[int]:
    """The ChatML prompt of `messages`, for a checkpoint trained with that template (contract 1)."""
    if service.chat_template != "chatml":
        raise ApiError(
            400,
            'this model has no chat template (its config.json lacks "chat_template": "chatml"); '
            "use /v1/completions with a plain prompt",
            "messages",
            "no_chat_template",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ApiError(400, f"messages[{i}]: expected {{'role': string, 'content': string}}", "messages")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return list(encode_chat(messages, add_generation_prompt=True).ids)
    except ValueError as e:  # e.g. a role the template does not know
        raise ApiError(400, f"messages: {e}", "messages") from None


def _chat_stop_ids() -> list[int]:
    return [IM_END]


# ---- turning tokens into text


class TextStream:
    """Incremental text of one request: UTF-8 across token boundaries (as `axiom generate` decodes it), stop
    ids left out, and stop strings cut, holding back any tail that may be the start of a stop string."""

    def __init__(self, stop: list[str], skip: tuple[int, ...]):
        self.enc = load_tokenizer()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop, self.skip = stop, skip
        self.text, self.sent = "", 0
        self.stopped = False  # a stop string was found: the text ends before it

    def add(self, token: int | None) -> str:
        """Append a token (None: the end, flushes the decoder) and return the text that is now safe to send."""
        if token is None:
            self.text += self.decoder.decode(b"", final=True)
        elif token not in self.skip:
            self.text += self.decoder.decode(token_bytes(self.enc, token))
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, self.sent - len(s)))) >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            end = len(self.text)
        elif token is None:
            end = len(self.text)
        else:  # hold back the longest tail that a stop string starts with
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece


async def decode(job: Job, spec: Spec, service: Service) -> AsyncIterator[tuple[str, str | None, int]]:
    """Submit `job` and yield (text piece, finish_reason or None, tokens so far) as tokens arrive; the last item
    has the finish_reason. Leaving early (the client went away) cancels the request."""
    text = TextStream(spec.stop, spec.params.stop_ids)
    service.submit(job)
    done, count = False, 0
    try:
        while not done:
            event = await job.events.get()
            if isinstance(event, ApiError):
                raise event
            token, reason = event
            count += 1
            piece = text.add(token)
            if text.stopped:
                reason = "stop"
            elif reason is not None:
                piece += text.add(None)
                reason = "stop" if reason == "stop" or text.stopped else "length"
            done = reason is not None
            yield piece, reason, count
    finally:
        if not done or text.stopped:
            service.cancel(job)  # a no-op for a request that already finished


# ---- the HTTP app


def build_app(service: Service):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    class EventStream(StreamingResponse):
        """Server-sent events whose generator is closed as soon as the response ends, also when the client
        went away mid-stream (closing it cancels the request and frees its slot)."""

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self.body_iterator.aclose()

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def models(_: HttpRequest) -> JSONResponse:
        entry = {"id": service.name, "object": "model", "created": int(time.time()), "owned_by": "axiom"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(_: HttpRequest) -> JSONResponse:
        return JSONResponse({"status": "ok", **service.stats()})

    async def completions(request: HttpRequest):
        return await answer(request, chat=False)

    async def chat_completions(request: HttpRequest):
        return await answer(request, chat=True)

    async def answer(request: HttpRequest, chat: bool):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error_response(ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json"))
        if not isinstance(body, dict):
            return error_response(ApiError(400, "the body must be a JSON object"))
        try:
            spec = check_request(body, service, chat)
        except ApiError as e:
            return error_response(e)
        job = Job(spec.prompt, spec.params, asyncio.get_running_loop())
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "created": int(time.time()), "model": service.name}
        tokens = decode(job, spec, service)
        try:
            if spec.stream:  # the status is sent with the first token: a 503 or an error before it is still JSON
                first = await until_disconnect(request, tokens, anext(tokens))
                return EventStream(sse(first, tokens, head, spec, chat), media_type="text/event-stream")
            text, reason, count = await until_disconnect(request, tokens, collect(tokens))
        except ApiError as e:
            return error_response(e)
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it
        usage = _usage(spec, count)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
            choice["finish_reason"] = reason
            return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage})
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return JSONResponse({**head, "object": "text_completion", "choices": [choice], "usage": usage})

    async def sse(first, tokens, head: dict, spec: Spec, chat: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str, reason: str | None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": piece} if piece or role else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}
            return f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]})}\n\n"

        count = 0
        try:
            if chat:
                yield chunk("", None, role=True)
            async for piece, reason, tokens_so_far in _chain(first, tokens):
                count = tokens_so_far
                if piece or reason:
                    yield chunk(piece, reason)
        except ApiError as e:  # after the first token the status is sent: the error goes in the stream
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            await tokens.aclose()
        if spec.include_usage:
            yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': _usage(spec, count)})}\n\n"
        yield "data: [DONE]\n\n"

    async def not_found(request: HttpRequest, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: " + ("no such route" if exc.status_code == 404 else exc.detail)
        return error_response(ApiError(exc.status_code, message))

    async def server_error(request: HttpRequest, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error ({type(exc).__name__})"))

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: server_error})


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def until_disconnect(request, tokens: AsyncIterator, awaitable):
    """The result of `awaitable` (which reads `tokens`), or ClientGone if the client disconnects first: then the
    awaitable is cancelled and `tokens` closed, which cancels the request and frees its slot."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
    if work.done():
        gone.cancel()
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    await tokens.aclose()
    raise ClientGone


async def wait_for_disconnect(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(tokens: AsyncIterator) -> tuple[str, str | None, int]:
    """A whole answer: (text, finish_reason, completion tokens)."""
    pieces, reason, count = [], None, 0
    async for item in tokens:
        piece, reason, count = item  # the last item's finish_reason and count are the answer's
        pieces.append(piece)
    return "".join(pieces), reason, count


def _usage(spec: Spec, completion_tokens: int) -> dict:
    n = len(spec.prompt)
    return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}
