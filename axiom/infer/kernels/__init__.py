"""Optional CPU kernels for decoding (decode.cpp): few-row linear products that stream the weights on every core
(and float32 prompts' products in register tiles), and the rest of a one-token step in a few calls (RMSNorm, RoPE +
cache write + attention, SwiGLU's gate).

`available()` builds them once with torch.utils.cpp_extension (a C++ compiler and ninja are needed; the build is
cached under torch's extensions folder, `TORCH_EXTENSIONS_DIR`, and later processes only load it) and registers
`torch.ops.axiom_decode.linear`, `linear_int8`, `decode_attention`, `rms_norm` and `silu_mul` with shape functions,
so torch.compile can trace through them. Where they cannot be had (not x86-64 with AVX-512, no
compiler, a failed build, or `AXIOM_DECODE_KERNELS=0`), `available()` is False and the callers use torch's own
kernels: same results to float32 rounding, slower (docs/benchmarks.md, "Decoding at the bandwidth limit").
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

from axiom.runtime import environment

SOURCE = Path(__file__).with_name("decode.cpp")
# AVX-512 F/BW for the loads and conversions, FMA for the products; the one bf16 x bf16 function that uses the
# AVX512-BF16 dot product is compiled for it alone and chosen at run time where the CPU has it, so one build serves
# every AVX-512 CPU. The name carries the version: a changed build gets a different folder.
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp"]
NAME = "axiom_decode_avx512_v10"


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
def available() -> bool:
    """Build (once) and load the kernels; False, with one warning, where they cannot be had."""
    reason = _usable_here()
    if reason is None:
        try:
            from torch.utils.cpp_extension import load

            with environment("PATH", _build_path()):  # torch's build runs `ninja` found through PATH
                load(NAME, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
        except Exception as e:  # any build or load failure: fall back, never fail decoding
            reason = f"build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
    if reason is not None:
        if reason != "AXIOM_DECODE_KERNELS=0":
            warnings.warn(f"axiom decode kernels unavailable ({reason}); using torch's kernels", stacklevel=2)
        return False
    _register_shapes()
    return True


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
