"""Optional CPU kernels for decoding (decode.cpp): few-row linear products that stream the weights on every core
(and float32 prompts' products in register tiles), and the rest of a one-token step in a few calls (RMSNorm, RoPE +
cache write + attention, SwiGLU's gate).

`available()` builds them once with torch.utils.cpp_extension (a C++ compiler and ninja are needed; the build is
cached under torch's extensions folder, `TORCH_EXTENSIONS_DIR`, and later processes only load it; one process at a
time, and a build that a kill interrupted never blocks a later one) and registers
`torch.ops.axiom_decode.linear`, `linear_int8`, `decode_attention`, `rms_norm` and `silu_mul` with shape functions,
so torch.compile can trace through them. Where they cannot be had (not x86-64 with AVX-512, no
compiler, a failed build, or `AXIOM_DECODE_KERNELS=0`), `available()` is False and the callers use torch's own
kernels: same results to float32 rounding, slower (docs/benchmarks.md, "Decoding at the bandwidth limit").
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from axiom.files import OutputBusy, output_lock
from axiom.runtime import environment

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.cpp")
# AVX-512 F/BW for the loads and conversions, FMA for the products; the one bf16 x bf16 function that uses the
# AVX512-BF16 dot product is compiled for it alone and chosen at run time where the CPU has it, so one build serves
# every AVX-512 CPU.
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp"]
BUILDER = "decode-kernels build"  # our lock's holder, as other processes name it while they wait
BUILD_WAIT_S = 300.0  # several times a build's time; wait that long for another process's before decoding without it


def _usable_here() -> str | None:
    """Why the kernels cannot run here, or None."""
    if os.environ.get("AXIOM_DECODE_KERNELS", "1") == "0":
        return "AXIOM_DECODE_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform != "linux":
        return f"{sys.platform}/{platform.machine()} (they are for x86-64 Linux)"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return f"this CPU has {torch.backends.cpu.get_cpu_capability()}, not AVX-512"
    if shutil.which("ninja", path=_build_path()) is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler or ninja"
    return None


def _build_path() -> str:
    """PATH for the build: the process's, then python's own folder, where pip's ninja (the decode extra) sits even
    when that folder is not on PATH (a virtual environment used without activating it)."""
    return os.pathsep.join(p for p in (os.environ.get("PATH", ""), str(Path(sys.executable).parent)) if p)


@functools.cache
def build_name() -> str:
    """The build's name, and its folder's under torch's extensions folder: one per source text and path, flags, python
    and torch. A changed source gets its own build, and so does each installation: two checkouts or environments
    used in turn would otherwise rebuild the kernels at every switch (the build's command names the source's path)."""
    key = hashlib.sha256()
    # sys.prefix, not sys.executable: the venv's `python` and `python3` (axiom's own launcher) are one installation
    for part in (SOURCE.read_bytes(), str(SOURCE.resolve()), " ".join(FLAGS), sys.prefix, torch.__version__):
        key.update(part if isinstance(part, bytes) else part.encode())
        key.update(b"\0")
    return f"axiom_decode_{key.hexdigest()[:16]}"


@functools.cache
def available() -> bool:
    """Build (once) and load the kernels; False, with one warning, where they cannot be had."""
    reason = _usable_here() or _build_and_load(BUILD_WAIT_S)
    if reason is not None:
        if reason != "AXIOM_DECODE_KERNELS=0":
            logger.warning("axiom decode kernels unavailable (%s); using torch's kernels", reason)
        return False
    _register_shapes()
    return True


def _build_and_load(wait_s: float) -> str | None:
    """Build the kernels if needed and load them, one process at a time; why that failed, or None.

    torch guards a build with a bare file (`lock` in the build folder) that a killed build leaves behind, and then
    every later process waits for it forever. So we hold our own lock around torch's (output_lock: released by the
    kernel on any exit) and remove torch's `lock` once no process builds; a build running elsewhere is waited for
    `wait_s` seconds at most, then decoding goes on with torch's kernels."""
    # A CUDA build of torch on a machine without CUDA warns as the module loads that it found no CUDA runtime: these
    # kernels are CPU ones, so that line is noise on every first decode.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import _get_build_directory, load  # torch's folder for a name (a private helper)

    deadline = time.monotonic() + wait_s
    try:
        name = build_name()
        build = Path(_get_build_directory(name, verbose=False))
        with output_lock(build, BUILDER, wait_s=wait_s, on_wait=functools.partial(_announce_wait, wait_s)):
            if busy := _settle_dead_build(build, deadline, wait_s):
                return f"still being built by pid {busy[0]} after {wait_s:g} s"
            if not (build / f"{name}.so").exists():  # the first decode of an installation: seconds to minutes
                logger.warning(
                    "building the decode kernels for this installation, once (up to a few minutes): %s", build
                )
            with environment("PATH", _build_path()):  # torch's build runs `ninja` found through PATH
                load(name, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
    except OutputBusy:
        return f"still being built by another process after {wait_s:g} s"
    except Exception as e:  # any build or load failure: fall back, never fail decoding
        return f"build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
    return None


def _announce_wait(wait_s: float, holder: dict) -> None:
    logger.warning(
        "waiting for the decode kernels being built by pid %s; after %g s decoding goes on with torch's kernels",
        holder.get("pid", "?"),
        wait_s,
    )


def _settle_dead_build(build: Path, deadline: float, wait_s: float) -> list[int]:
    """Under our lock no build of ours runs, but a killed one may have left torch's `lock` (which torch's builder
    holds open while it builds) and its compiler still running in the build folder. Wait until no process does
    either, then remove a `lock` left behind; the pids still at it if that outlasts `deadline`, else []."""
    lock = build / "lock"
    announced = False
    while users := _builders(build, lock):
        if time.monotonic() >= deadline:
            return users
        if not announced:
            _announce_wait(wait_s, {"pid": users[0]})
            announced = True
        time.sleep(0.2)
    if lock.exists():
        logger.warning("removing %s, left behind by a build of the decode kernels that was stopped", lock)
        lock.unlink(missing_ok=True)
    return []


def _builders(folder: Path, lock: Path) -> list[int]:
    """Other processes that hold `lock` open (torch's builder) or compile in `folder` (a killed builder's ninja
    and compilers run on); Linux /proc, where processes we may not inspect are not seen. A shell that merely sits
    in the folder does not count."""
    folder, lock, locked = os.path.realpath(folder), os.path.realpath(lock), os.path.exists(lock)
    users = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to inspect
            cwd = os.readlink(proc / "cwd")
            compiling = (cwd == folder or cwd.startswith(folder + os.sep)) and _is_build_tool(proc)
            if compiling or (locked and lock in _open_files(proc)):
                users.append(int(proc.name))
    return users


def _is_build_tool(proc: Path) -> bool:
    """ninja or a compiler, assembler or linker it runs (`comm`: the program's name, cut to 15 bytes)."""
    name = (proc / "comm").read_text().strip()
    return name in ("ninja", "as", "collect2") or name.startswith(("cc", "c++", "g++", "gcc", "clang", "ld", "x86_64"))


def _open_files(proc: Path) -> set[str]:
    found = set()
    for fd in (proc / "fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            found.add(os.readlink(fd))
    return found


def _register_shapes() -> None:
    """Output shapes for torch.compile's tracing (the ops themselves stay opaque calls in the graph)."""

    @torch.library.register_fake("axiom_decode::linear")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("axiom_decode::linear_int8")
    def _(x, q, scale):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("axiom_decode::decode_attention")
    def _(qkv, keys, values, positions, cos, sin, scale):
        return qkv.new_empty(qkv.shape[0], qkv.shape[1] - 2 * keys.shape[1] * keys.shape[3])

    @torch.library.register_fake("axiom_decode::rms_norm")
    def _(x, w, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("axiom_decode::silu_mul")
    def _(gu):
        return gu.new_empty(gu.shape[0], gu.shape[1] // 2)
