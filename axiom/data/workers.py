"""Worker processes for `axiom prepare`: `results_in_order`, a map over units in unit order.

Not multiprocessing.Pool: its terminate() can wait forever when a worker is sending a result larger than a pipe
holds as the pool is stopped (its handler threads then wait for a lock held by that worker: cpython#96995), and
Ctrl-C or SIGTERM during prepare stops the pool while results of megabytes are in flight. Here each worker has a pipe
of its own and no lock is shared: stopping is killing the workers, and a worker's death is the end of its pipe.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.pool import ExceptionWithTraceback
from multiprocessing.process import BaseProcess
from typing import Any

from axiom.errors import AxiomError
from axiom.signals import sigint_held


class WorkerDied(AxiomError):
    """A worker process ended without finishing its unit: not the input's fault, so the work done is kept."""


def results_in_order(units: list, workers: int, work: Callable, job: tuple) -> Iterator[Any]:
    """`work(unit, *job)` for each unit, in unit order, by up to `workers` processes with at most two units each in
    flight (bounded memory). A worker that dies (kill -9, the kernel's out-of-memory killer) is a WorkerDied; leaving
    the generator (done, an error, Ctrl-C) kills the workers."""
    workers = min(workers, len(units))  # no idle processes (each holds a tokenizer)
    if workers <= 1:
        for unit in units:
            yield work(unit, *job)
        return
    # spawn: workers import only the module of `work` (no torch), and no forked copy of the parent's threads
    context = multiprocessing.get_context("spawn")
    procs: list[BaseProcess] = []
    pipes: list[Connection] = []
    try:
        # Ctrl-C reaches the whole process group, and prepare answers it: the workers inherit SIGINT blocked, so
        # none prints a KeyboardInterrupt traceback (one cut while its interpreter started did), and a Ctrl-C while
        # they are started reaches prepare once they are. The first spawn starts multiprocessing's resource
        # tracker, which unblocks SIGINT after starting it: it is started before the block (on POSIX: Windows has
        # none, and cannot start one).
        if os.name == "posix":
            resource_tracker.ensure_running()
        with sigint_held():
            for _ in range(workers):
                ours, theirs = context.Pipe()
                pipes.append(ours)
                process = context.Process(target=_serve, args=(theirs, work, job), daemon=True)
                process.start()
                procs.append(process)
                theirs.close()  # the worker's end is the worker's alone: its death ends our pipe
        owners: deque[int] = deque()  # the worker of each unit in flight, in unit order
        for unit in units:
            worker = min(range(workers), key=owners.count)  # a worker's units are done in the order it got them
            _send(pipes[worker], unit)
            owners.append(worker)
            if len(owners) == 2 * workers:
                yield _receive(pipes[owners.popleft()])
        while owners:
            yield _receive(pipes[owners.popleft()])
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.join()
        for pipe in pipes:
            pipe.close()


def _serve(pipe: Connection, work: Callable, job: tuple) -> None:
    """A worker: the result of each unit its pipe brings (or the error, with its traceback), until the pipe ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # where no blocked SIGINT was inherited (Windows): prepare answers
    try:
        while True:
            unit = pipe.recv()
            try:
                result = (True, work(unit, *job))
            except Exception as e:
                result = (False, ExceptionWithTraceback(e, e.__traceback__))
            pipe.send(result)
    except (EOFError, BrokenPipeError):  # the parent is gone (killed): nobody waits for us
        pass


def _send(pipe: Connection, unit: object) -> None:
    try:
        pipe.send(unit)
    except BrokenPipeError:
        raise _died() from None


def _receive(pipe: Connection) -> Any:
    try:
        ok, value = pipe.recv()
    except (EOFError, ConnectionResetError):
        raise _died() from None
    if not ok:
        raise value
    return value


def _died() -> WorkerDied:
    return WorkerDied(
        "prepare: a worker process ended without finishing its unit (killed, or out of memory?); the units done are "
        "kept: run the same command again to continue (with fewer --workers if memory is short)"
    )
