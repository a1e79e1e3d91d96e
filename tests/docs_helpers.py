"""The command blocks of README.md and docs/*.md, and a checkout to run them in as a user would (tests/test_docs.py).

A block is a fenced ```bash, ```sh or ```console block. Its commands run one by one with bash, verbatim, in a
checkout that looks like a user's after `make demo`; a block that cannot run here carries a marker on the line
above its fence, `<!-- not run by tests: REASON -->`, and the tests require a reason.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SHELLS = {"bash", "sh", "console"}
FENCE = re.compile(r"^\s*```(\w*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*not run by tests:(.*?)-->\s*$")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
# Programs that serve until they are stopped: the line they print once they accept connections, their default port.
SERVERS = {"axiom serve": (r"axiom serve: .+ on http://", 8000), "llama-server": (r"listening on http://", 8080)}
COMMAND_TIMEOUT_S = 600  # a documented command's longest run
SERVER_READY_S = 120  # how long a server may take to print its ready line
LLAMA_CPP_PROGRAMS = ("llama-completion", "llama-server", "llama-perplexity", "llama-tokenize", "llama-bench")
# A resumed run appends to these, so each checkout gets its own copy; every other file of runs/ is a hard link.
APPENDED = (".csv", ".log")


@dataclass(frozen=True)
class Block:
    doc: str  # the file, relative to the repository
    line: int  # the line of the opening fence, from 1
    commands: tuple[str, ...]
    not_run: str | None  # the marker's reason ("" for a marker without one); None: the block runs

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


@dataclass(frozen=True)
class Result:
    command: str
    returncode: int
    output: str

    def report(self) -> str:
        return f"$ {self.command}\nexit status {self.returncode}\n{self.output[-4000:]}"


def documents(repo: Path) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def command_blocks(repo: Path) -> list[Block]:
    return [block for path in documents(repo) for block in blocks_of(path, repo)]


def blocks_of(path: Path, repo: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        if fence.group(1) in SHELLS:
            commands = split_commands(lines[i + 1 : end], console=fence.group(1) == "console")
            blocks.append(Block(str(path.relative_to(repo)), i + 1, commands, marker_above(lines, i)))
        i = end + 1
    return blocks


def marker_above(lines: list[str], fence: int) -> str | None:
    above = next((line for line in reversed(lines[:fence]) if line.strip()), "")
    marker = MARKER.match(above)
    return marker.group(1).strip() if marker else None


def split_commands(lines: list[str], console: bool = False) -> tuple[str, ...]:
    """One string per command: continuation lines (`\\`) and here-documents joined, comments and blank lines
    dropped; in a console block only the lines after a `$ ` prompt (and their continuations)."""
    commands, current, heredoc = [], [], None
    for line in lines:
        if not current and heredoc is None:
            if console:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        current.append(line)
        if heredoc is not None:
            if line.strip() != heredoc:
                continue
            heredoc = None
        elif opened := HEREDOC.search(line):
            heredoc = opened.group(1)
            continue
        elif line.rstrip().endswith("\\"):
            continue
        commands.append("\n".join(current))
        current = []
    return tuple(commands)


def words(command: str) -> list[str]:
    """The command as the shell splits it, without its comment: how two spellings of one command compare."""
    return shlex.split(command.replace("\\\n", " "), comments=True)


def needs_shared(command: str) -> bool:
    """Whether the command uses what lies beside the repository in ../shared (data, llama.cpp's programs)."""
    return "../shared" in command or any(word in LLAMA_CPP_PROGRAMS for word in words(command))


def server_of(command: str) -> tuple[str, int] | None:
    """(the ready line's pattern, the port) of a command that serves until stopped, else None."""
    for program, (ready, default_port) in SERVERS.items():
        if command.startswith(program):
            args = words(command)
            port = int(args[args.index("--port") + 1]) if "--port" in args else default_port
            return ready, port
    return None


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def make_checkout(repo: Path, dest: Path, runs: Path | None = None) -> Path:
    """A user's checkout at `dest`: the repository's tracked files (linked), .venv (the running Python's
    environment), ../shared beside it when the repository has one, and a copy of `runs` when given."""
    dest.mkdir(parents=True)
    for name in tracked_top_level(repo):
        (dest / name).symlink_to(repo / name)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    shared = repo.parent / "shared"
    if shared.is_dir():
        (dest.parent / "shared").symlink_to(shared)
    if runs is not None:
        shutil.copytree(runs, dest / "runs", copy_function=_link_or_copy)
    return dest


def tracked_top_level(repo: Path) -> list[str]:
    try:
        listed = subprocess.run(["git", "-C", str(repo), "ls-files"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive)
        return sorted(p.name for p in repo.iterdir() if p.name not in {".git", ".venv", "runs"})
    return sorted({line.split("/")[0] for line in listed.stdout.splitlines()})


def _link_or_copy(src: str, dst: str) -> None:
    if src.endswith(APPENDED):
        shutil.copy2(src, dst)
    else:
        os.link(src, dst)


def command_env(repo: Path) -> dict[str, str]:
    """The environment of an activated .venv: its programs first on PATH (llama.cpp's before them where
    ../shared has them), and the repository's axiom imported. OpenMP's threads sleep while they wait, as the
    Makefile's demos run: on cores shared with other jobs, spinning threads make a command several times slower."""
    path = [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    llama_cpp = repo.parent / "shared" / "tools" / "llama.cpp" / "bin"
    if llama_cpp.is_dir():
        path.insert(0, str(llama_cpp))
    pythonpath = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PATH": os.pathsep.join(path), "PYTHONPATH": pythonpath, "OMP_WAIT_POLICY": "PASSIVE"}


def run_command(command: str, cwd: Path, env: dict[str, str]) -> Result:
    """The command with bash in `cwd`, stdin closed (an interactive command sees the end of its input). A server
    is started, must print its ready line, and is then stopped with SIGTERM, after which it must exit 0."""
    if server := server_of(command):
        return run_server(command, server[0], cwd, env)
    try:
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", command], **_io(cwd, env), timeout=COMMAND_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        return Result(command, -1, f"{e.output or ''}\n(still running after {COMMAND_TIMEOUT_S} s)")
    return Result(command, done.returncode, done.stdout)


def _io(cwd: Path, env: dict[str, str]) -> dict:
    """A command's folder and environment; its input closed, its output and errors read together as text."""
    return {
        "cwd": cwd,
        "env": env,
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.STDOUT,
        "text": True,
    }


def run_server(command: str, ready: str, cwd: Path, env: dict[str, str]) -> Result:
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], **_io(cwd, env), start_new_session=True)
    lines: list[str] = []  # appended by the reader thread as the server prints them

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + SERVER_READY_S
    while proc.poll() is None and time.monotonic() < deadline and not any(re.search(ready, x) for x in lines):
        time.sleep(0.2)
    up = any(re.search(ready, line) for line in lines)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=10)
    output = "".join(lines) + ("" if up else f"\n(no line matching {ready!r} within {SERVER_READY_S} s)")
    return Result(command, proc.returncode if up else (proc.returncode or -1), output)


@dataclass
class DocRun:
    """The command blocks of one document, run in order in a checkout of their own: a block may use what an
    earlier block of the same document wrote, as a reader working down the page would."""

    blocks: list[Block]
    checkout: Path
    env: dict[str, str]
    results: dict[int, list[Result]] = field(default_factory=dict)

    def through(self, index: int, runnable: Callable[[Block], bool]) -> list[Result]:
        """The results of block `index`, running every earlier block that `runnable` allows first."""
        for i in range(index):
            if runnable(self.blocks[i]):
                self.block(i)
        return self.block(index) if runnable(self.blocks[index]) else []

    def block(self, index: int) -> list[Result]:
        """The results of block `index` alone (run once), up to its first failing command."""
        if index not in self.results:
            self.results[index] = []
            for command in self.blocks[index].commands:
                self.results[index].append(run_command(command, self.checkout, self.env))
                if self.results[index][-1].returncode != 0:
                    break
        return self.results[index]
