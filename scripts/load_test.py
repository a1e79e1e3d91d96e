"""Load test of `axiom serve` on 127.0.0.1: N concurrent clients x M greedy requests each, at several N, against
a server that batches (--max-batch B) and one that decodes one request at a time (--max-batch 1).

    python scripts/load_test.py                                   # tiny preset, untied, random weights
    python scripts/load_test.py --preset small
    python scripts/load_test.py --ckpt runs/demo/run/checkpoints/best --concurrency 1 4 16 --requests 4

Every response is checked against the text the engine gives the prompt alone (what `axiom generate --temperature 0`
prints, decoded through the batching server's path: its `--max-batch` rows, compiled with `--compile`, so that the
decoding steps are the same graphs): all requests must complete and be correct, or the script exits 1. Before
timing, it also measures the smallest lead of a greedy choice over the runner-up among the expected tokens: batching
moves logits by rounding only (~1e-7, tests/test_engine.py), so a lead far above that cannot flip. Prints, per
server and concurrency, throughput (completion tokens/s over the wall time of the level) and p50/p95 request latency
(with `--stream`, or hostile requests, the clients stream, and the time to first token and between tokens too), then
the speed-up of batching. Rounds alternate the servers (ABBA) so that load from other processes falls on all; the
figures are the medians over rounds. Bounded: every request has a timeout, and every server is stopped at the end,
also when something fails.

`--device cuda --dtype bfloat16 --compile` runs the servers (and the reference decoding) that way. In bfloat16 a
prefill of several prompts together rounds differently enough from one alone that a greedy choice with a small lead
may flip: the printed margin says how far the reference's choices are from that.

`--hostile N` mixes N hostile requests into every level and round, sent one after another beside the normal
clients, whose requests then stream: numbers that break the maths (a temperature of 1e-45, a seed past 64 bits),
malformed bodies (nested 100,000 deep, a 5,000-digit integer, invalid UTF-8, 2 MiB, the wrong Content-Type),
refused fields, streams dropped mid-way. Each must get its own answer (200, 400, 413 or 415; never a 500) and every
normal stream must still give the prompt's text decoded alone, or the script exits 1. `--no-baseline` starts the
batching server only (tests/test_serve.py runs a small hostile load that way).

`--vs-transformers-serve` also starts `transformers serve --continuous-batching` (transformers >= 5.17 with its
serving extra: `pip install 'axiom-lm[hf-serve]'`) on an `axiom export --format llama` folder of the same weights,
offline, on the same device and dtype (and with its `--compile` where given: with continuous batching, transformers
chooses its compilation and CUDA graphs itself, and its batch size). Its clients send the same requests to its
/v1/completions (same prompts, max tokens, greedy, streamed or not), in the same rounds as the other servers; the
same figures are printed for it, with the ratio of axiom's batching server's tokens/s to its. Its texts are compared
with the reference and counted ("same" in the table), not required: other numerics (another attention kernel,
another order of sums) may flip a greedy choice where two logits nearly tie. A failed request fails the run for it
too. Where `transformers serve` cannot run here (a missing package, a model it cannot load offline), the script
says why in one line and exits 1. `--transformers-serve-args '...'` passes it more flags (on a CPU,
`--cb-max-batch-tokens 256 --cb-num-blocks 64` shorten its warm-up, which runs its largest batch); `--hostile`,
which checks axiom serve's own answers, does not go with it.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import math
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import torch

from axiom.cli.args import add_device_argument
from axiom.config import get_config
from axiom.dtypes import FOLDER_DTYPES, describe, dtype_name
from axiom.errors import AxiomError
from axiom.infer.engine import Engine
from axiom.infer.fast import load_for_inference
from axiom.infer.generate import generate
from axiom.model.checkpoint import CONFIG, config_of, read_meta, save_weights
from axiom.model.transformer import Axiom
from axiom.runtime import pick_device
from axiom.text.stream import token_bytes
from axiom.text.tokenizer import EOS_ID, load_tokenizer, outside_vocabulary

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The history of the city begins",
    "def fibonacci(n):",
    "In the beginning God created",
    "The capital of France is",
    "Once upon a time there was",
    "import numpy as np\n",
    "The mitochondria is",
    "Dear committee members,",
    "1. Preheat the oven",
    "SELECT name FROM users WHERE",
    "The theory of relativity states",
    "Breaking news:",
    "Roses are red,",
    "To be or not to be",
    "The quick brown fox",
    "Ladies and gentlemen,",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint to serve (default: --preset with random weights)")
    p.add_argument("--preset", default="tiny", help="without --ckpt: this preset, untied, random weights (seed 0)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="clients at once (default: 1 4 16)")
    p.add_argument("--requests", type=int, default=4, help="requests per client per level (default: 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    p.add_argument("--max-batch", type=int, default=16, help="the batching server's --max-batch (default: 16)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per server, alternated (default: 2)")
    add_device_argument(p)
    p.add_argument("--dtype", default="float32", help="the servers' --dtype (and the reference decoding's)")
    p.add_argument("--compile", action="store_true", help="start the servers with --compile")
    p.add_argument(
        "--stream", action="store_true", help="the clients stream: time to first token and inter-token latency too"
    )
    p.add_argument("--hostile", type=int, default=0, help="hostile requests mixed into each level and round")
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also start the --max-batch 1 server, for the speed-up (default: yes)",
    )
    p.add_argument(
        "--vs-transformers-serve",
        action="store_true",
        help="also load `transformers serve --continuous-batching` on a Llama export of the same weights, the same "
        "way, in the same rounds",
    )
    p.add_argument(
        "--transformers-serve-args",
        default="",
        metavar="FLAGS",
        help="more flags for transformers serve, one string, e.g. '--cb-max-batch-tokens 256 --cb-num-blocks 64' "
        "(on a CPU its warm-up runs a batch of the largest size it infers from memory: these keep it short)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    check_args(p, args)
    return args


def main() -> int:
    args = parse_args()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(args.ckpt).resolve() if args.ckpt else random_checkpoint(args.preset, Path(tmp) / "ckpt")
            expected, margin = expected_texts(ckpt, args)
            servers: dict[str, Server] = {}
            try:  # each server is stopped, whatever fails after it started
                servers["batched"] = start_axiom_serve(ckpt, args.max_batch, args)
                if args.baseline:
                    servers["one_at_a_time"] = start_axiom_serve(ckpt, 1, args)
                if args.vs_transformers_serve:
                    servers["transformers_serve"] = start_transformers_serve(ckpt, Path(tmp) / "llama", args)
                results = run_levels(servers, expected, args)
            finally:
                for server in servers.values():
                    server.stop()
    except AxiomError as e:
        raise SystemExit(f"load_test.py: {e}") from None
    report = {
        "ckpt": args.ckpt or f"{args.preset} preset with an untied output layer, random weights (seed 0)",
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "rounds": args.rounds,
        "hostile_per_level": args.hostile,
        "min_greedy_margin": margin,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "transformers": version("transformers") if args.vs_transformers_serve else None,
        "cpu_threads": torch.get_num_threads(),
        "levels": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0 if all(r["errors"] == 0 for level in results for r in level["servers"].values()) else 1


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, in one line each, what cannot be measured: counts below 1, and a comparison that cannot run here."""
    for flag in ("concurrency", "requests", "max_tokens", "max_batch", "rounds"):
        values = getattr(args, flag)
        if min(values if isinstance(values, list) else [values]) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.hostile < 0:
        p.error("--hostile must be 0 or more")
    if not args.vs_transformers_serve:
        if args.transformers_serve_args:
            p.error("--transformers-serve-args goes with --vs-transformers-serve")
        return
    try:
        args.transformers_serve_args = shlex.split(args.transformers_serve_args)
    except ValueError as e:
        p.error(f"--transformers-serve-args: {e}")
    if args.hostile:
        p.error("--hostile checks axiom serve's own answers; run it without --vs-transformers-serve")
    if dtype_name(args.dtype) not in FOLDER_DTYPES:
        p.error(f"--dtype {args.dtype}: transformers serve is compared at {describe(FOLDER_DTYPES)}")
    missing = transformers_serve_missing()
    if missing:
        p.error(f"--vs-transformers-serve: transformers serve cannot run here: {missing}")


def transformers_serve_missing() -> str | None:
    """Why `transformers serve` with continuous batching and /v1/completions cannot start here, or None. Looks at
    the installed files only: importing transformers takes seconds."""
    if find_spec("transformers") is None:
        return "transformers is not installed (pip install 'axiom-lm[hf-serve]')"
    completions = Path(find_spec("transformers").origin).parent / "cli" / "serving" / "completion.py"
    if not completions.is_file():
        return f"transformers {version('transformers')} has no /v1/completions in its serve; it needs >= 5.17"
    missing = [name for name in ("fastapi", "uvicorn", "pydantic", "openai") if find_spec(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install 'axiom-lm[hf-serve]')"
    return None


def random_checkpoint(preset: str, directory: Path) -> Path:
    # Untied output layer: a random tied model mostly repeats its last token, which would make the check weak.
    cfg = get_config(preset, ["tie_embeddings=false"])
    torch.manual_seed(0)
    directory.mkdir()
    save_weights(Axiom(cfg.model).state_dict(), cfg, directory, step=0)
    return directory


def expected_texts(ckpt: Path, args: argparse.Namespace) -> tuple[dict[str, str], float]:
    """Each prompt's greedy text decoded alone (as `axiom generate --temperature 0` gives it), and the smallest lead
    of a chosen token's logit over the runner-up along the way. With `--compile` through an engine of the batching
    server's shape, whose compiled steps (a row's step does not depend on the other rows') the server then loads from
    the compile cache; eager steps work on the running rows alone, so an engine of one prompt's size serves."""
    enc = load_tokenizer()
    prompts = {prompt: enc.encode_ordinary(prompt) for prompt in PROMPTS}
    vocab_size = config_of(read_meta(ckpt), ckpt / CONFIG).model.vocab_size  # checked before the model is readied
    for prompt, ids in prompts.items():
        if problem := outside_vocabulary(ids, vocab_size):
            raise AxiomError(f"{ckpt}: prompt {prompt!r}: {problem}")
    model, _ = load_for_inference(str(ckpt), args.device, args.dtype)
    engine = Engine(model, max_batch=args.max_batch, compile=True) if args.compile else None
    n = args.max_tokens
    texts, margin = {}, float("inf")
    for prompt, ids in prompts.items():
        new = generate(model, [ids], n, temperature=0.0, eos_id=EOS_ID, engine=engine)[0]
        texts[prompt] = b"".join(token_bytes(enc, t) for t in new if t != EOS_ID).decode(errors="replace")
        with torch.no_grad():
            top = model(torch.tensor([ids + new], device=model.embed.weight.device))[0, len(ids) - 1 : -1]
            top = top.float().topk(2, dim=-1).values
        margin = min(margin, float((top[:, 0] - top[:, 1]).min()))
    return texts, margin


@dataclass
class Server:
    """A server under load: its process (the leader of a process group of its own), its port, the model its requests
    name, and whether it is `axiom serve` (every text must equal the reference, every stream end with
    `data: [DONE]`) or `transformers serve` (texts counted; its streams end with the usage event)."""

    proc: subprocess.Popen
    port: int
    model: str = "m"
    axiom: bool = True

    def stop(self) -> None:
        """SIGTERM to the server's group and wait for it; SIGKILL whatever is left of the group (transformers serve
        runs its model in a child process, which must not outlive it holding the device's memory)."""
        group = self.proc.pid
        with contextlib.suppress(ProcessLookupError):  # it has exited
            os.killpg(group, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):  # all of it has exited
            os.killpg(group, signal.SIGKILL)
        self.proc.wait()


def start_axiom_serve(ckpt: Path, max_batch: int, args: argparse.Namespace) -> Server:
    cmd = [sys.executable, "-m", "axiom.cli", "serve", "--ckpt", str(ckpt), "--port", "0"]
    cmd += ["--max-batch", str(max_batch), "--model-name", "m", "--dtype", args.dtype]
    cmd += (["--device", args.device] if args.device else []) + (["--compile"] if args.compile else [])
    errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 (open while the server runs; read if it does not start)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=errors, text=True, start_new_session=True)
    server = Server(proc, 0)
    line = proc.stdout.readline()
    if " on http://" not in line:
        server.stop()
        errors.seek(0)
        said = errors.read().strip().splitlines() or [repr(line)]
        raise SystemExit(f"axiom serve did not start: {said[-1]}")
    server.port = int(line.split(" on http://")[1].split(":")[1].split("/")[0])
    return server


# Offline: no Hub look-up, no check for a newer version on PyPI at start
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception)\b")  # "OSError: ...", typer's "Error: ..."
UVICORN_STARTED = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def start_transformers_serve(ckpt: Path, folder: Path, args: argparse.Namespace) -> Server:
    """`transformers serve --continuous-batching` on `folder`, an `axiom export --format llama` of `ckpt`, on the
    device and in the dtype of the axiom servers; its requests name the folder. Its log is read as it comes (the
    pipe must not fill) for the port it bound, and its last lines say why if it stops before."""
    from axiom.interop.export import export  # imports the tokenizer converter: only for this comparison

    export(ckpt, folder, "llama", "float32")  # transformers casts to --dtype as it loads, as axiom serve does
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--continuous-batching"]
    cmd += ["--device", str(pick_device(args.device)), "--dtype", dtype_name(args.dtype)]
    cmd += ["--host", "127.0.0.1", "--port", "0"] + (["--compile"] if args.compile else [])
    cmd += args.transformers_serve_args
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=os.environ | OFFLINE,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    server = Server(proc, 0, str(folder), axiom=False)
    last_lines: deque[str] = deque(maxlen=200)
    started = threading.Event()

    def read_log() -> None:
        for line in proc.stderr:
            last_lines.append(line.strip())
            if not started.is_set() and (found := UVICORN_STARTED.search(line)):
                server.port = int(found.group(1))
                started.set()

    threading.Thread(target=read_log, daemon=True).start()
    deadline = time.monotonic() + 600  # loading, and on a GPU the batching's warm-up and CUDA graphs
    while not started.wait(0.5) and proc.poll() is None and time.monotonic() < deadline:
        pass
    if not started.is_set():
        server.stop()
        time.sleep(0.5)  # the log's last lines
        lines = [line for line in last_lines if line] or ["no output"]
        why = next((line for line in reversed(lines) if ERROR_LINE.search(line)), lines[-1])
        state = "timed out" if proc.returncode in (-signal.SIGTERM, -signal.SIGKILL) else "stopped"
        raise SystemExit(f"transformers serve did not start ({state}): {why}")
    return server


@dataclass
class Reply:
    """One completion: its text, latency and completion tokens; streamed, also the arrival time of each event that
    carried text, from the request's start (the first is the time to first token)."""

    text: str
    latency_s: float
    tokens: int
    text_arrivals_s: list[float] = field(default_factory=list)


def request(server: Server, prompt: str, max_tokens: int, stream: bool = False) -> Reply:
    """One greedy completion, whole or streamed (its events read as they arrive)."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    arrivals: list[float] = []
    events: list[dict] = []
    try:
        options = {"stream_options": {"include_usage": True}} if stream else {}
        conn.request("POST", "/v1/completions", json.dumps(body | options), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200 or not stream:
            raw = response.read()
        else:
            raw = b""
            while line := response.readline():
                raw += line
                if line.startswith(b"data: {"):
                    events.append(json.loads(line.removeprefix(b"data: ")))
                    if any(c.get("text") for c in events[-1].get("choices", ())):
                        arrivals.append(time.perf_counter() - start)
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {raw[:300]!r}")
    if not stream:
        data = json.loads(raw)
        return Reply(data["choices"][0]["text"], time.perf_counter() - start, data["usage"]["completion_tokens"])
    ended = raw.rstrip().endswith(b"data: [DONE]") if server.axiom else bool(events and "usage" in events[-1])
    if any("error" in e for e in events) or not ended:
        raise RuntimeError(f"the stream broke off: {raw[-300:]!r}")
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    return Reply(text, time.perf_counter() - start, events[-1]["usage"]["completion_tokens"], arrivals)


def post_raw(port: int, body: bytes, content_type: str = "application/json") -> int:
    """POST /v1/completions with `body` as it is; the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": content_type})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def drop_mid_stream(port: int) -> int:
    """Start a long stream, read its first token's event, and disconnect: 200 if the stream had started."""
    body = json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 4000, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=300)
    head = f"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    try:
        sock.sendall(head.encode() + body)
        reader = sock.makefile("rb")
        status = int(reader.readline().split()[1])
        while status == 200 and not reader.readline().startswith(b"data: {"):
            pass
        return status
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def completion_body(**fields) -> bytes:
    return json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 8, **fields}).encode()


# (what, how to send it, the status it must get)
HOSTILE: tuple[tuple[str, Callable[[int], int], int], ...] = (
    ("temperature 1e-45", lambda port: post_raw(port, completion_body(temperature=1e-45)), 200),
    ("temperature Infinity", lambda port: post_raw(port, completion_body()[:-1] + b', "temperature": Infinity}'), 400),
    ("seed 2**64", lambda port: post_raw(port, completion_body(temperature=1, seed=2**64)), 400),
    ("top_p 1e-300", lambda port: post_raw(port, completion_body(temperature=1, top_p=1e-300)), 200),
    (
        "max_tokens of 5,000 digits",
        lambda port: post_raw(port, b'{"model": "m", "max_tokens": ' + b"9" * 5000 + b"}"),
        400,
    ),
    ("JSON nested 100,000 deep", lambda port: post_raw(port, b"[" * 100_000 + b"]" * 100_000), 400),
    ("invalid UTF-8", lambda port: post_raw(port, b'{"model": "m", "prompt": "\xff\xfe"}'), 400),
    ("a 2 MiB body", lambda port: post_raw(port, completion_body(prompt="x" * (2 << 20))), 413),
    ("a 1 MiB prompt", lambda port: post_raw(port, completion_body(prompt="word " * 200_000)), 400),
    ("a form Content-Type", lambda port: post_raw(port, completion_body(), "application/x-www-form-urlencoded"), 415),
    ("5 stop strings", lambda port: post_raw(port, completion_body(stop=["a", "b", "c", "d", "e"])), 400),
    ("logit_bias", lambda port: post_raw(port, completion_body(logit_bias={"1": 100})), 400),
    ("a stream dropped after its first token", drop_mid_stream, 200),
)


def hostile(port: int, n: int) -> list[str]:
    """Send n hostile requests, cycling through HOSTILE; what answered otherwise than it must."""
    unexpected = []
    for i in range(n):
        what, send, status = HOSTILE[i % len(HOSTILE)]
        try:
            got = send(port)
        except OSError as e:  # a reset connection is an answer too, but not the one wanted
            got = f"{type(e).__name__}: {e}"
        if got != status:
            unexpected.append(f"hostile {what}: got {got}, not {status}")
    return unexpected


def load(server: Server, clients: int, expected: dict[str, str], args: argparse.Namespace) -> dict:
    """`clients` threads, each sending `args.requests` requests one after another (prompts cycle through PROMPTS),
    and with `args.hostile` one more thread sending that many hostile requests meanwhile."""
    latencies, first_tokens, gaps, tokens, same, errors = [], [], [], [0], [0], []
    lock = threading.Lock()
    per_client, stream = args.requests, args.stream or args.hostile > 0

    def client(c: int) -> None:
        for i in range(per_client):
            prompt = PROMPTS[(c * per_client + i) % len(PROMPTS)]
            try:
                reply = request(server, prompt, args.max_tokens, stream)
            except Exception as e:  # counted, reported, and the script fails
                with lock:
                    errors.append(f"{prompt!r}: {e}")
                continue
            with lock:
                latencies.append(reply.latency_s)
                first_tokens.extend(reply.text_arrivals_s[:1])
                gaps.extend(b - a for a, b in itertools.pairwise(reply.text_arrivals_s))
                tokens[0] += reply.tokens
                same[0] += reply.text == expected[prompt]
                if reply.text != expected[prompt] and server.axiom:
                    errors.append(f"{prompt!r}: text differs from the prompt decoded alone")

    def attacker() -> None:
        unexpected = hostile(server.port, args.hostile)
        with lock:
            errors.extend(unexpected)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    threads += [threading.Thread(target=attacker)] if args.hostile else []
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "tokens_per_s": tokens[0] / wall,
        "p50_s": percentile(latencies, 0.5),
        "p95_s": percentile(latencies, 0.95),
        "ttft_p50_s": percentile(first_tokens, 0.5),
        "ttft_p95_s": percentile(first_tokens, 0.95),
        "itl_p50_s": percentile(gaps, 0.5),
        "itl_p95_s": percentile(gaps, 0.95),
        "completed": len(latencies),
        "same_text": same[0],
        "errors": len(errors),
        "error_samples": errors[:3],
    }


def percentile(values: list[float], q: float) -> float | None:
    """The value below which a share q of `values` lies (nearest rank); None for none."""
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)] if values else None


def run_levels(servers: dict[str, Server], expected: dict[str, str], args: argparse.Namespace) -> list[dict]:
    for server in servers.values():  # warm-up: first-call costs are not timed
        request(server, PROMPTS[0], 4)
    levels = []
    for clients in args.concurrency:
        rounds: dict[str, list[dict]] = {name: [] for name in servers}
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                rounds[name].append(load(servers[name], clients, expected, args))
        summary = {}
        for name, runs in rounds.items():
            summary[name] = {
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
                **{key: median_of(runs, key) for key in LATENCIES},
                "completed": sum(x["completed"] for x in runs),
                "same_text": sum(x["same_text"] for x in runs),
                "errors": sum(x["errors"] for x in runs),
                "error_samples": [e for x in runs for e in x["error_samples"]][:3],
                "rounds_tokens_per_s": [round(x["tokens_per_s"], 1) for x in runs],
            }
        levels.append(
            {
                "concurrency": clients,
                "servers": summary,
                "batching_speedup": ratio(summary, "one_at_a_time"),
                "axiom_vs_transformers": ratio(summary, "transformers_serve"),
            }
        )
    return levels


def ratio(summary: dict, other: str) -> float | None:
    """The batching axiom server's tokens/s over `other`'s; None without `other` (or where it made none)."""
    if other not in summary or not summary[other]["tokens_per_s"]:
        return None
    return summary["batched"]["tokens_per_s"] / summary[other]["tokens_per_s"]


LATENCIES = ("p50_s", "p95_s", "ttft_p50_s", "ttft_p95_s", "itl_p50_s", "itl_p95_s")


def median_of(runs: list[dict], key: str) -> float | None:
    """The median over rounds of a latency figure; None where no round had one (time to first token and
    inter-token latency come from streamed requests only)."""
    values = [x[key] for x in runs if x[key] is not None]
    return statistics.median(values) if values else None


def print_table(report: dict) -> None:
    print(f"axiom serve load test: {report['ckpt']}, {report['requests_per_client']} requests per client, ", end="")
    print(f"{report['max_tokens']} new tokens each, greedy; median of {report['rounds']} rounds per server")
    print(f"smallest greedy margin among the expected tokens: {report['min_greedy_margin']:.2e}")
    if report["hostile_per_level"]:
        print(f"{report['hostile_per_level']} hostile requests beside each level's clients, whose requests stream; ")
        print("errors count the hostile requests answered otherwise than they must be, too")
    if report["transformers"]:
        print("same: completions whose text equals the prompt decoded alone by axiom (for transformers serve ", end="")
        print("a count, not a requirement)")
    head = f"{'clients':>7}  {'server':<22} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7} {'done':>5} {'same':>5}"
    print(head + f" {'errors':>6}   first token p50/p95 s, between tokens p50/p95 ms (streamed)")
    labels = {"batched": f"max-batch {report['max_batch']}", "one_at_a_time": "max-batch 1"}
    labels["transformers_serve"] = "transformers serve"
    for level in report["levels"]:
        for name, r in level["servers"].items():
            print(f"{level['concurrency']:>7}  {labels[name]:<22} {r['tokens_per_s']:>9.1f} ", end="")
            print(f"{r['p50_s']:>7.3f} ", end="")
            print(f"{r['p95_s']:>7.3f} {r['completed']:>5} {r['same_text']:>5} {r['errors']:>6}", end="")
            if r["ttft_p50_s"] is not None:
                print(f"   {r['ttft_p50_s']:.3f}/{r['ttft_p95_s']:.3f}", end="")
                if r["itl_p50_s"] is not None:
                    print(f", {r['itl_p50_s'] * 1e3:.1f}/{r['itl_p95_s'] * 1e3:.1f}", end="")
            print()
            for e in r["error_samples"]:
                print(f"           error: {e}")
        if level["batching_speedup"] is not None:
            print(f"{'':>7}  batching speed-up {level['batching_speedup']:.2f}x")
        if level["axiom_vs_transformers"] is not None:
            print(f"{'':>7}  axiom / transformers serve {level['axiom_vs_transformers']:.2f}x tokens/s")
    transformers = f", transformers {report['transformers']}" if report["transformers"] else ""
    print(f"load average {report['load_average'][0]:.2f}, torch {report['torch']}{transformers}, ", end="")
    print(f"{report['cpu_threads']} threads")


if __name__ == "__main__":
    sys.exit(main())
