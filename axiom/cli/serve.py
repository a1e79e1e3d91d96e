"""`axiom serve`: a checkpoint over the OpenAI API (axiom/infer/serve.py), on one port until SIGTERM or Ctrl-C.

SIGTERM stops accepting connections, lets the requests in flight finish, then exits 0 (Ctrl-C does the same and
exits 130; a second Ctrl-C answers the requests still decoding 503 and exits at once). Starlette and uvicorn (the
`serve` extra) are imported only when the server starts.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import signal
import socket
import sys
from pathlib import Path

from axiom.cli.args import add_decoding_path_arguments, add_inference_arguments, eager_decoding
from axiom.errors import AxiomError, require
from axiom.infer.fast import load_for_inference
from axiom.infer.openai_api import BODY_TIMEOUT_S, HEAD_TIMEOUT_S
from axiom.model.checkpoint import run_dir_of
from axiom.text.chatml import is_chat_tuned

ABANDON_WAIT_S = 1.0  # a forced stop waits this long for the handlers to send their 503s
# asyncio's event loop and h11, the ones the tests run, also where uvicorn[standard] installed uvloop and httptools,
# which uvicorn would take: httptools' protocol sends a stream chunked to an HTTP/1.0 client, which cannot read
# chunks (RFC 9112, 6.1), and the shutdown here is written against asyncio's server.
UVICORN_RUNTIME = {"loop": "asyncio", "http": "h11"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint directory to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", default="8000", help="port (default: 8000; 0: any free port)")
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name besides localhost and loopback addresses that requests to a server on a loopback address may "
        "be addressed to (their Host header), e.g. a reverse proxy's public name; repeatable. Other names are "
        "refused: a web page could point its own name here (DNS rebinding)",
    )
    parser.add_argument(
        "--model-name",
        help="the model id clients send and /v1/models lists (default: the checkpoint's name, as RUN-step_000400 "
        "for RUN/checkpoints/step_000400, or the folder's name)",
    )
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default: 8)")
    parser.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for a slot before 503 answers (default: 64)"
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="open connections at most: a new one beyond them closes the one waiting longest for a request, and a "
        "request finding every other one busy is answered 503 (default: 256)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=BODY_TIMEOUT_S,
        help=f"seconds a request body may take to arrive whole before a 408 answer (default: {BODY_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--head-timeout",
        type=float,
        default=HEAD_TIMEOUT_S,
        help="seconds a request's head (request line and headers) may take to arrive whole, from its connection "
        f"opening or the previous response, before the connection is closed (default: {HEAD_TIMEOUT_S:g})",
    )
    add_decoding_path_arguments(parser)  # with the compiled step, all its graphs are compiled before the first request
    add_inference_arguments(parser)


def run(args: argparse.Namespace) -> None:
    if args.max_batch < 1:
        raise AxiomError(f"--max-batch {args.max_batch}: must be at least 1")
    if args.max_queue < 0:
        raise AxiomError(f"--max-queue {args.max_queue}: must be 0 or more")
    if args.max_connections < 1:
        raise AxiomError(f"--max-connections {args.max_connections}: must be at least 1")
    for flag in ("body_timeout", "head_timeout"):
        if not 0 < getattr(args, flag) < math.inf:
            raise AxiomError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be a positive number of seconds")
    uvicorn = require("uvicorn", "axiom serve", "axiom-lm[serve]")
    require("starlette", "axiom serve", "axiom-lm[serve]")  # uvicorn does not need it; axiom.infer.serve does
    from axiom.infer.serve import Service, build_app, with_connection_limits

    sock = _listen(args.host, _port(args.port))
    with sock:  # closed when a check below refuses, or the model fails to load
        local_names = _local_names(sock.getsockname()[0], args.allow_host)
        name = args.model_name or model_name(args.ckpt)
        if not name.isprintable():  # a surrogate too: a folder's name that is not UTF-8
            raise AxiomError(f"model name {_shown(name)}: not printable text; give one with --model-name")
        model, meta = load_for_inference(args.ckpt, args.device, args.dtype)
        compile_ = not eager_decoding(args, next(model.parameters()).device, "axiom serve")
        service = Service(model, name, is_chat_tuned(meta), args.max_batch, args.max_queue, compile_)
        host, port = sock.getsockname()[:2]
        logging.basicConfig(level=logging.INFO, format="axiom serve: %(message)s", stream=sys.stderr)
        app = build_app(service, args.body_timeout, local_names)
        # No lifespan: the app has no start-up or shutdown hooks, and a forced stop would log its task's cancellation.
        config = uvicorn.Config(
            app, log_level="warning", timeout_graceful_shutdown=None, lifespan="off", **UVICORN_RUNTIME
        )
        config.load()  # makes the protocol class, wrapped here
        config.http_protocol_class = with_connection_limits(
            config.http_protocol_class, args.head_timeout, args.max_connections
        )

        class Server(uvicorn.Server):
            async def shutdown(self, sockets: list | None = None) -> None:
                service.closing.set()  # a request whose body is still arriving is answered 503, not awaited
                # A second Ctrl-C (force_exit) answers what still decodes 503 now, not cut off unanswered. Watched while
                # uvicorn shuts down: from Python 3.12 on, its shutdown waits for every connection to close
                # (asyncio.Server.wait_closed), force_exit or not, so a stream left decoding would hold it to its end.
                forced = asyncio.ensure_future(self._abandon_when_forced())
                try:
                    await super().shutdown(sockets)
                finally:
                    forced.cancel()
                if self.force_exit:
                    service.abandon()  # where the watcher had not yet seen force_exit (Python 3.11 returns at once)
                    if self.server_state.tasks:
                        await asyncio.wait(self.server_state.tasks, timeout=ABANDON_WAIT_S)

            async def _abandon_when_forced(self) -> None:
                while not self.force_exit:  # set by uvicorn's signal handler; uvicorn polls it alike
                    await asyncio.sleep(0.1)
                service.abandon()

        server = Server(config)
        service.start()  # compiled: after compiling
        # uvicorn re-raises the signal it shut down for once it is done; with this handler that ends in a return.
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        print(f"axiom serve: {name} on http://{host}:{port}/v1 (max batch {args.max_batch})", flush=True)
        try:
            server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
            service.stop()
        print(f"axiom serve: stopped after {service.finished} requests", flush=True)


def model_name(ckpt: str) -> str:
    """The model id a checkpoint is served under, the same however its path is spelt: RUN-NAME for
    RUN/checkpoints/NAME (e.g. axiom-380m-step_000400), else the checkpoint folder's name."""
    path = Path(os.path.realpath(ckpt))
    run = run_dir_of(path)
    return f"{run.name}-{path.name}" if run is not None else path.name or "axiom"


def _local_names(address: str, allowed: list[str]) -> frozenset[str] | None:
    """The names besides localhost and loopback addresses that a server listening on `address` answers, or None (any
    name) where it listens on another address: requests from elsewhere may name it as they like."""
    if not ipaddress.ip_address(address).is_loopback:
        if allowed:
            raise AxiomError(f"--allow-host {_shown(allowed[0])}: --host {address} answers every name already")
        return None
    from axiom.infer.serve import authority_name  # Starlette: the serve extra

    for name in allowed:
        if not (authority_name(name) and name.isprintable()):
            raise AxiomError(f"--allow-host {_shown(name)}: expected a host name, e.g. chat.example.org")
    return frozenset(authority_name(name) for name in allowed)


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535):
        raise AxiomError(f"--port {_shown(text)}: expected a port number from 0 to 65535 (0: any free port)")
    return int(text)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a port in use is said at once (connections wait
    in the backlog until the server runs)."""
    if not host.strip():
        raise AxiomError(f"--host {host!r}: empty; 127.0.0.1 listens on this machine only, 0.0.0.0 on every interface")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        _check_encodable(host)
        return socket.create_server((host, port), family=family)
    except (OSError, ValueError) as e:  # in use, not an address here, a privileged port, not a host name at all
        why = getattr(e, "strerror", None) or e
        raise AxiomError(
            f"--host {_shown(host)} --port {port}: cannot listen ({why}); try another --host or --port"
        ) from None


def _check_encodable(host: str) -> None:
    """A ValueError, in bind's words, for a host that the socket module cannot encode: bind raises a TypeError for it
    after create_server made its socket, which create_server then leaves open (it closes it on an OSError only)."""
    if "\x00" in host:
        raise ValueError("host name must not contain null character")
    try:
        if not host.isascii():  # encoded as IDNA: a byte that is not UTF-8 (a surrogate), a label over 63 characters
            host.encode("idna")
    except UnicodeError:
        raise ValueError("encoding of hostname failed") from None


def _shown(value: str) -> str:
    """A flag's value as typed, or quoted with escapes where it holds a control character."""
    return value if value.isprintable() else repr(value)
