"""`axiom bench generate --vs-llamacpp`: the same weights through llama.cpp's converter, timed by its llama-bench
in rounds alternating with ours."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from axiom.config import Config
from axiom.dtypes import short_name
from axiom.errors import AxiomError
from axiom.interop.export import export
from axiom.model.checkpoint import save_weights

# prebuilt llama.cpp beside a checkout of the repository (../shared/tools/llama.cpp, see its README), absent on a
# fresh clone; an installed package (no pyproject.toml above it) has no such place
_CHECKOUT = Path(__file__).resolve().parents[2]
DEFAULT_LLAMACPP = (
    _CHECKOUT.parent / "shared" / "tools" / "llama.cpp" if (_CHECKOUT / "pyproject.toml").is_file() else None
)


def find_llamacpp(folder: str | None) -> Path | None:
    """The llama.cpp folder (bin/llama-bench and convert): `folder`, or DEFAULT_LLAMACPP when it is None; None where
    the default is absent (an absent `folder` is an error)."""
    root = Path(folder) if folder else DEFAULT_LLAMACPP
    if root is None:
        return None
    if (root / "bin" / "llama-bench").is_file() and (root / "convert").is_file():
        return root
    if folder:
        raise AxiomError(f"--llamacpp-dir {folder}: no bin/llama-bench and convert there")
    return None


def export_gguf(llamacpp: Path, cfg: Config, weights: dict[str, torch.Tensor], dtype_name: str) -> Path:
    """`weights` as a GGUF file of llama.cpp's type nearest `dtype_name`, through our `--format llama` export and
    llama.cpp's own converter; returned alone in a temporary folder (the caller removes the folder). On any failure
    the folder is removed here."""
    folder = Path(tempfile.mkdtemp(prefix="axiom-bench-"))
    out = folder / f"model-{short_name(dtype_name)}.gguf"
    try:
        ckpt, hf = folder / "ckpt", folder / "hf"
        ckpt.mkdir()
        save_weights(weights, cfg, ckpt)
        export(ckpt, hf, fmt="llama", dtype="bfloat16" if dtype_name == "bfloat16" else "float32")
        shutil.rmtree(ckpt)
        cmd = [str(llamacpp / "convert"), sys.executable, str(hf), str(out), short_name(dtype_name)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        shutil.rmtree(hf)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise AxiomError(f"llama.cpp's converter failed ({last}); it needs transformers and sentencepiece")
    except BaseException:  # a converter that failed halfway leaves part of a file: rmdir alone would fail on it
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return out


def llamacpp_round(llamacpp: Path, gguf: Path, lengths: list[int], new_tokens: int) -> dict[str, float]:
    """One llama-bench run (-r 1, same thread count as ours): decode and prefill tokens/s as it reports them."""
    cmd = [str(llamacpp / "bin" / "llama-bench"), "-m", str(gguf), "-n", str(new_tokens), "-r", "1", "-o", "json"]
    cmd += ["-p", ",".join(map(str, lengths)), "-t", str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise AxiomError(f"llama-bench failed: {last}")
    rates = {}
    for test in json.loads(done.stdout):
        key = "decode" if test["n_gen"] else f"prefill_{test['n_prompt']}"
        rates[key] = test["avg_ts"]
    return rates


def vs_llamacpp(
    llamacpp: Path, gguf: Path, our_round: Callable[[], dict], lengths: list[int], new_tokens: int, rounds: int
) -> dict:
    """Ours and llama-bench in alternating rounds (ABBA); medians and ratios ours / llama.cpp."""
    llamacpp_round(llamacpp, gguf, lengths, new_tokens)  # warm-up: the file into the page cache
    ours_r: dict[str, list[float]] = {}
    theirs_r: dict[str, list[float]] = {}
    for r in range(rounds):
        order = [("ours", our_round), ("llamacpp", lambda: llamacpp_round(llamacpp, gguf, lengths, new_tokens))]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            for key, value in fn().items():
                (ours_r if name == "ours" else theirs_r).setdefault(key, []).append(value)
    ours = {k: statistics.median(v) for k, v in ours_r.items()}
    theirs = {k: statistics.median(v) for k, v in theirs_r.items()}
    return {
        "llamacpp": {
            "gguf_type": gguf.stem.removeprefix("model-"),
            "threads": torch.get_num_threads(),
            "tokens_per_s": theirs,
            "rounds_tokens_per_s": theirs_r,
        },
        "ours_vs_llamacpp_tokens_per_s": ours,
        "ours_vs_llamacpp_rounds": ours_r,
        "ratio_vs_llamacpp": {k: ours[k] / theirs[k] for k in ours if k in theirs},
    }
