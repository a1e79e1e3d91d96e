"""The OpenAI API (completions, chat completions, models) over the decoding engine: what `axiom serve` runs.

    HTTP handlers (asyncio, uvicorn)            engine thread
    parse + check the request  ──submit──▶  inbox ─▶ Engine.step() in a loop: continuous batching
    text, stop strings, SSE   ◀──tokens──   (one token per running request per step)

One thread owns the `Engine` (axiom/infer/engine.py) and does all decoding; handlers only talk to it through its
inbox (submit, cancel) and receive tokens on their own asyncio queue. At most `max_batch` requests decode at once
and `max_queue` more wait; beyond that a request is answered 503 at once. A client that disconnects cancels its
request at the next token boundary, freeing its slot. Errors are JSON in the OpenAI shape (axiom/infer/openai_api.py),
and nothing a client sends can stop the server: a body is read up to MAX_BODY_BYTES and checked in a thread (off the
event loop every stream waits on); a request whose own row fails gets a 500 alone while the others decode on; a step
that fails as a whole fails the requests in flight (500) and the engine starts afresh.

Connections are bounded too (`with_connection_limits`): a request's head must arrive whole within HEAD_TIMEOUT_S
(else the connection is closed) and its body within BODY_TIMEOUT_S (else 408), and `axiom serve --max-connections`
caps open connections: a new one beyond it closes those waiting longest for a head, so idle clients cannot hold
them all (a request is answered 503 only while every other connection has a request in flight).

This module imports Starlette (the `serve` extra); `axiom serve` imports it only when the server starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import ipaddress
import json
import logging
import queue
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import partial

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from axiom.infer.engine import Engine, Request, SamplingParams
from axiom.infer.openai_api import (
    BODY_TIMEOUT_S,
    MAX_BODY_BYTES,
    ApiError,
    ServedModel,
    Spec,
    check_content_type,
    check_request,
    chunk,
    completion,
    parse_body,
    usage,
    usage_chunk,
)
from axiom.model.transformer import Axiom
from axiom.text.chatml import TEMPLATE_NAME
from axiom.text.stream import TextStream

log = logging.getLogger(__name__)


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", code="shutting_down")


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


# One request per compiled graph of the decoding step: greedy, and sampled with each of the cut-offs of
# axiom.infer.sampling.Cut (none, a top-k among the largest logits, a top-p over the whole sorted vocabulary).
WARM_UP = (
    SamplingParams(max_new_tokens=3, temperature=0.0),
    SamplingParams(max_new_tokens=3, temperature=1.0),
    SamplingParams(max_new_tokens=3, temperature=1.0, top_k=50),
    SamplingParams(max_new_tokens=3, temperature=1.0, top_p=0.9),
)


class Service:
    """The engine, the thread that drives it, and the bookkeeping the handlers need (capacity, the model served).
    `chat`: the model is chat-tuned (axiom.text.chatml.is_chat_tuned), so /v1/chat/completions applies the template."""

    def __init__(self, model: Axiom, name: str, chat: bool, max_batch: int, max_queue: int, compile: bool):
        self.model, self.name = model, name
        self.served = ServedModel(name, model.cfg.max_seq_len, chat)  # what request checking needs
        self.max_batch, self.compile = max_batch, compile
        self.capacity = max_batch + max_queue
        self.engine = Engine(model, max_batch=max_batch, compile=compile)
        self.finished = 0
        self._inbox: queue.SimpleQueue[tuple[str, Job | None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._accepted = 0  # submitted and not yet finished
        self._jobs: dict[int, Job] = {}
        self._stopping = False
        self._abandoned = False
        self.closing = asyncio.Event()  # set on the event loop when the server shuts down: no body is awaited more
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
        """Compile every graph a request can need before the first one arrives: compiling later would hold every
        stream in flight for as long (the engine thread compiles)."""
        for params in WARM_UP:
            request = self.engine.submit([0], params)
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
        if self._abandoned:
            raise shutting_down()
        with self._lock:
            if self._accepted >= self.capacity:
                raise ApiError(503, "the server is busy: all slots and the queue are full; retry later", code="busy")
            self._accepted += 1
        self._inbox.put(("submit", job))
        self._wake.set()

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))
        self._wake.set()

    def abandon(self) -> None:
        """Answer every request accepted 503 and stop decoding it (the server is made to stop now: a second
        Ctrl-C), so that its handler ends with an answer rather than being cancelled mid-request. On the event loop,
        as `submit`: a request submitted before this is in the inbox before it, one after is refused. Once only."""
        if self._abandoned:
            return
        self._abandoned = True
        self._inbox.put(("abandon", None))
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
            if token is None:  # this request alone failed and left the batch
                log.warning("request %d failed: %s", request.id, request.error)
                event = ApiError(500, f"decoding failed: {request.error}")
            else:
                event = (token, request.finish_reason)
            by_loop.setdefault(job.loop, []).append((job, event))
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
            elif kind == "abandon":
                for held in list(self._jobs.values()):
                    self.engine.cancel(held.request)
                    held.post(shutting_down())
                    self._finish(held)
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


# ---- turning tokens into text


async def decode(job: Job, spec: Spec, service: Service) -> AsyncIterator[tuple[str, str | None, int]]:
    """Submit `job` and yield (text piece, finish_reason or None, tokens so far) as tokens arrive; the last item
    has the finish_reason. Leaving before the engine has finished the request (the client went away, a stop
    string) cancels it."""
    text = TextStream(spec.params.stop_ids, spec.stop)
    service.submit(job)
    ended, count = False, 0  # ended: the engine finished the request (a stop id or its length)
    try:
        while True:
            event = await job.events.get()
            if isinstance(event, ApiError):
                raise event
            token, engine_reason = event
            count += 1
            ended = engine_reason is not None
            piece = text.push(token)
            if ended and not text.stopped:
                piece += text.finish()
            reason = "stop" if text.stopped else "length" if ended else None
            yield piece, reason, count
            if reason is not None:
                return
    finally:
        if not ended:
            service.cancel(job)


# ---- the HTTP app

# The chat page runs its own inline script and style, talks to this server only, and is never put in a frame.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

# A proxy passes each event on as it comes (nginx buffers a response unless told not to) and caches none.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def authority_name(authority: str) -> str:
    """The host name of a Host header or an origin's authority: without its port or an IPv6 address's brackets,
    lowercased, without a final dot."""
    if authority.startswith("["):
        name = authority[1 : authority.find("]")]
    else:
        name = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
    return name.lower().rstrip(".")


def is_loopback_name(name: str) -> bool:
    """localhost, a name under .localhost (browsers resolve these to this machine alone), or a loopback address."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_browser_request(method: str, headers: Headers, local_names: frozenset[str] | None) -> None:
    """ApiError 403 for what a web page on another site can make its visitor's browser send here.

    A browser sends any page's POST (a "simple" one, without asking first) and names the page in Origin: a POST
    from a page that is not this server's own is refused, so a site cannot start generations on a user's server.
    With `local_names` (a server listening on a loopback address: the names it answers besides localhost and
    loopback addresses), a request addressed to another name is refused too: that name is a site's own, resolved
    to this machine after the page loaded (DNS rebinding), whose page would pass as this server's."""
    host = headers.get("host", "")
    if local_names is not None and host:
        name = authority_name(host)
        if not is_loopback_name(name) and name not in local_names:
            raise ApiError(
                403,
                f"Host {host[:100]!r}: this server listens on a loopback address and answers localhost, loopback "
                f"addresses{' and ' + ', '.join(sorted(local_names)) if local_names else ''} only (another name that "
                f"leads here may be a web page's); to answer {name[:100]}, pass --allow-host {name[:100]}",
                code="host_not_allowed",
            )
    if method in ("GET", "HEAD"):  # a GET changes nothing
        return
    origin = headers.get("origin")
    # Sec-Fetch-Site: set by browsers alone (no page can), from 2019-23 versions on, and only to https or localhost
    site = headers.get("sec-fetch-site")
    if site is not None:
        same = site in ("same-origin", "none")  # not "same-site" (a neighbouring subdomain) nor "cross-site"
    elif origin is None:  # a program: browsers name the page in Origin on every POST
        return
    else:  # an older browser, or plain http to another name: the page's origin against the address it came to
        forwarded = headers.get("x-forwarded-host", "").split(",")[0].strip()  # a proxy's public name
        same = same_authority(origin, host) or same_authority(origin, forwarded)
    if not same:
        page = f"the web page at {origin[:100]!r}" if origin is not None else f"a web page ({site[:40]!r})"
        raise ApiError(
            403,
            f"{method} from {page}, not this server's own page ({host[:100]}): refused, "
            "as any site a user visits could send it; programs send no Origin header and are answered",
            code="cross_origin",
        )


def same_authority(origin: str, host: str) -> bool:
    """Whether the origin `scheme://name[:port]` names the host `name[:port]`, a port left out being the scheme's."""
    try:
        parts, ours = urllib.parse.urlsplit(origin), urllib.parse.urlsplit(f"//{host}")
        default = {"http": 80, "https": 443}.get(parts.scheme)
        if default is None or not parts.hostname or not ours.hostname:
            return False
        theirs = (parts.hostname, default if parts.port is None else parts.port)
        return theirs == (ours.hostname, default if ours.port is None else ours.port)
    except ValueError:  # a port that is not a number, a bracket left open
        return False


class BrowserGuard:
    """ASGI middleware that answers what `check_browser_request` refuses with its 403, before any route runs."""

    def __init__(self, app, local_names: frozenset[str] | None):
        self.app, self.local_names = app, local_names

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            try:
                check_browser_request(scope["method"], Headers(scope=scope), self.local_names)
            except ApiError as e:
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed as soon as the response ends, also when the client went away
    mid-stream (closing it cancels the request and frees its slot)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class OpenAiApp:
    """The routes of `axiom serve` over one `Service`: GET /v1/models and /health, POST /v1/completions and
    /v1/chat/completions (answered whole, or streamed as server-sent events), and the chat page at GET /."""

    def __init__(
        self, service: Service, body_timeout: float = BODY_TIMEOUT_S, local_names: frozenset[str] | None = None
    ):
        self.service, self.body_timeout, self.local_names = service, body_timeout, local_names
        self.page = importlib.resources.files(__package__).joinpath("static/chat.html").read_text(encoding="utf-8")

    def starlette(self) -> Starlette:
        routes = [
            Route("/", self.chat_page, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        return Starlette(
            routes=routes,
            middleware=[Middleware(BrowserGuard, local_names=self.local_names)],
            exception_handlers={HTTPException: self.http_error, Exception: self.failed},
        )

    async def models(self, _: HttpRequest) -> JSONResponse:
        served = self.service.served
        entry = {"id": served.name, "object": "model", "created": int(time.time()), "owned_by": "axiom"}
        # beyond OpenAI's fields, as vLLM's max_model_len: what a client (the chat page) needs to know
        entry |= {"max_model_len": served.context, "chat_template": TEMPLATE_NAME if served.chat else None}
        return JSONResponse({"object": "list", "data": [entry]})

    async def chat_page(self, _: HttpRequest) -> HTMLResponse:
        return HTMLResponse(self.page, headers=PAGE_HEADERS)

    async def health(self, _: HttpRequest) -> JSONResponse:
        return JSONResponse({"status": "ok", **self.service.stats()})

    async def completions(self, request: HttpRequest) -> Response:
        return await self.answer(request, chat=False)

    async def chat_completions(self, request: HttpRequest) -> Response:
        return await self.answer(request, chat=True)

    async def answer(self, request: HttpRequest, chat: bool) -> Response:
        try:
            check_content_type(request.headers.get("content-type"))
            raw = await read_body(request, self.body_timeout, self.service.closing)
            # Parsing and tokenizing up to a MiB take a while: in a thread, so that the event loop, which every
            # client's stream and /health wait on, goes on meanwhile.
            spec = await asyncio.to_thread(lambda: check_request(parse_body(raw), self.service.served, chat))
        except ApiError as e:
            return error_response(e)
        job = Job(spec.prompt, spec.params, asyncio.get_running_loop())
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "created": int(time.time()), "model": self.service.name}
        tokens = decode(job, spec, self.service)
        try:
            if spec.stream:  # the status is sent with the first token: a 503 or an error before it is still JSON
                first = await until_disconnect(request, tokens, anext(tokens))
                events = self.events(first, tokens, head, spec, chat)
                return EventStream(events, media_type="text/event-stream", headers=STREAM_HEADERS)
            text, reason, count = await until_disconnect(request, tokens, collect(tokens))
        except ApiError as e:
            return error_response(e)
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it
        return JSONResponse(completion(head, text, reason, usage(len(spec.prompt), count), chat))

    async def events(self, first, tokens: AsyncIterator, head: dict, spec: Spec, chat: bool) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer, from its first (already decoded) item on."""
        count = 0
        try:
            if chat:
                yield sse(chunk(head, "", None, chat, role=True))
            async for piece, reason, tokens_so_far in _chain(first, tokens):
                count = tokens_so_far
                if piece or reason:
                    yield sse(chunk(head, piece, reason, chat))
        except ApiError as e:  # after the first token the status is sent: the error goes in the stream
            yield sse(e.body())
        finally:
            await tokens.aclose()
        if spec.include_usage:
            yield sse(usage_chunk(head, usage(len(spec.prompt), count), chat))
        yield "data: [DONE]\n\n"

    async def http_error(self, request: HttpRequest, exc: HTTPException) -> Response:
        message = f"{request.method} {request.url.path}: " + ("no such route" if exc.status_code == 404 else exc.detail)
        return error_response(ApiError(exc.status_code, message), exc.headers)  # a 405's Allow

    async def failed(self, request: HttpRequest, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error ({type(exc).__name__})"))


# A new connection beyond --max-connections closes one that has waited at least this long for a request head.
IDLE_BEFORE_CLOSED_S = 1.0


def with_connection_limits(protocol: type, head_seconds: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol class `protocol` (h11's: axiom/cli/serve.py) with limits uvicorn lacks, so that idle
    clients cannot hold every one of `max_connections` (uvicorn's own `limit_concurrency` is left unset: its 503 is
    plain text, and it logs a warning per refusal):
    - a connection whose request head has not arrived whole within `head_seconds` of the connection opening or of
      its previous response is closed (uvicorn times out neither a connection that never sends a request nor a
      head sent a byte at a time);
    - a new connection beyond the limit closes the connections that have waited longest for a head, at least
      IDLE_BEFORE_CLOSED_S (one that has just sent its request may not have been read yet: closing it would drop that
      request unanswered), so that only requests in flight, or connections that opened together, make a request
      wait: it is answered 503 (`code: "busy"`, in OpenAI's shape) and its connection closed."""

    class Limited(protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.app = partial(_within_limit, self.app, self.connections)
            self._arm_head_timer()
            excess = len(self.connections) - max_connections
            if excess > 0:
                waited = self.loop.time() - IDLE_BEFORE_CLOSED_S
                idle = [c for c in self.connections if c._awaiting_head() and c._waiting_since <= waited]
                idle.sort(key=_since)
                for other in idle[:excess]:
                    other.transport.close()
                    self.connections.discard(other)  # now: its connection_lost comes a loop turn later

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._waiting_after:  # a head arrived: its request is under way
                self._head_timer.cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._waiting_after = self.cycle  # the request before the awaited head (None: none yet)
            self._waiting_since = self.loop.time()
            if hasattr(self, "_head_timer"):
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_seconds, self._head_timed_out)

        def _awaiting_head(self) -> bool:
            in_flight = self.cycle is not None and not self.cycle.response_complete
            return self.cycle is self._waiting_after and not in_flight

        def _head_timed_out(self) -> None:
            if self._awaiting_head():
                self.transport.close()

    def _since(connection: Limited) -> float:
        return connection._waiting_since

    async def _within_limit(app, connections: set, scope, receive, send) -> None:
        if len(connections) <= max_connections:  # the asking one counted
            await app(scope, receive, send)
            return
        busy = ApiError(503, "the server is busy: every connection has a request in flight; retry later", code="busy")
        await error_response(busy, {"connection": "close"})(scope, receive, send)

    return Limited


def build_app(
    service: Service, body_timeout: float = BODY_TIMEOUT_S, local_names: frozenset[str] | None = None
) -> Starlette:
    return OpenAiApp(service, body_timeout, local_names).starlette()


async def read_body(
    request: HttpRequest, timeout: float = BODY_TIMEOUT_S, closing: asyncio.Event | None = None
) -> bytes:
    """The body, refused (413) as soon as its Content-Length or the bytes received exceed MAX_BODY_BYTES: a
    larger one is never held in memory; refused (408) when it has not arrived whole within `timeout` seconds, so
    that a client trickling its body does not hold its connection and handler for ever; and refused (503) once
    `closing` is set, so that it does not hold the server's shutdown either."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the body exceeds {MAX_BODY_BYTES:,} bytes", code="body_too_large")
    if declared.isdigit() and (len(declared) > 12 or int(declared) > MAX_BODY_BYTES):
        raise too_large

    async def received() -> bytes:
        chunks, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > MAX_BODY_BYTES:
                raise too_large
            chunks.append(piece)
        return b"".join(chunks)

    body = asyncio.ensure_future(received())
    waits = {body, asyncio.ensure_future((closing or asyncio.Event()).wait())}
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    if body.done() and not body.cancelled():
        return body.result()  # or its ApiError
    if closing is not None and closing.is_set():
        raise shutting_down()
    raise ApiError(408, f"the body did not arrive within {timeout:g} s", code="body_timeout")


def error_response(e: ApiError, headers: Mapping[str, str] | None = None) -> Response:
    """The error as JSON in ASCII: a field name or value quoted from the request may hold a lone surrogate (a JSON
    escape such as \\ud800), which UTF-8 cannot encode."""
    return Response(json.dumps(e.body()), status_code=e.status, headers=headers, media_type="application/json")


def sse(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"


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
