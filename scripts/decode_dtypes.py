"""Batch-1 decoding speed of the inference dtypes against each other, in one process: one set of weights prepared
once per dtype (`axiom.infer.fast.prepare_model`), each decoded through its own `Engine` (what `axiom generate`
runs), in alternating rounds (ABBA) so that the machine's drifting memory bandwidth hits every dtype alike. Prints
tokens/s after the prefill per round, the medians, and each dtype's ratio to the first.

    python scripts/decode_dtypes.py --preset axiom-380m --dtypes bfloat16,int8 [--rounds 6] [--new-tokens 64]

This is the measure of "int8 vs our bfloat16" (docs/benchmarks.md, "Decoding at the bandwidth limit"): two
separate `axiom bench generate` runs minutes apart measured the VM's bandwidth as much as the code.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from axiom.config import PRESETS, get_config
from axiom.dtypes import INFERENCE_DTYPES
from axiom.errors import run_script
from axiom.infer.engine import Engine, SamplingParams
from axiom.infer.fast import prepare_model
from axiom.model.transformer import Axiom


def decode_rate(engine: Engine, prompt: list[int], new_tokens: int) -> float:
    """Tokens/s of one greedy request after its first token (which comes from the prefill)."""
    request = engine.submit(prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
    engine.step()
    start = time.perf_counter()
    while engine.has_work():
        engine.step()
    return (len(request.tokens) - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="axiom-380m", choices=list(PRESETS))
    parser.add_argument("--dtypes", default="bfloat16,int8", help="comma-separated; ratios are to the first")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if min(args.rounds, args.prompt_len, args.new_tokens) < 1:
        parser.error("--rounds, --prompt-len and --new-tokens must be at least 1")
    dtypes = args.dtypes.split(",")
    if unknown := [d for d in dtypes if d not in INFERENCE_DTYPES]:
        parser.error(f"--dtypes {','.join(unknown)}: choose from {', '.join(INFERENCE_DTYPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = Axiom(get_config(args.preset).model)
    engines = {d: Engine(prepare_model(copy.deepcopy(base), d), max_batch=1) for d in dtypes}
    del base
    prompt = torch.randint(0, engines[dtypes[0]].model.cfg.vocab_size, (args.prompt_len,)).tolist()
    for engine in engines.values():  # warm-up: first-call allocations, untimed
        decode_rate(engine, prompt, 4)
    rates: dict[str, list[float]] = {d: [] for d in dtypes}
    for r in range(args.rounds):
        for d in dtypes if r % 2 == 0 else dtypes[::-1]:
            rates[d].append(decode_rate(engines[d], prompt, args.new_tokens))
    medians = {d: statistics.median(v) for d, v in rates.items()}
    for d in dtypes:
        rounds = " ".join(f"{v:.1f}" for v in rates[d])
        ratio = medians[d] / medians[dtypes[0]]
        print(f"{d:9s} {medians[d]:6.1f} tokens/s (rounds: {rounds})  {ratio:.2f}x {dtypes[0]}")
    print(json.dumps({"threads": torch.get_num_threads(), "rounds": rates, "median_tokens_per_s": medians}))


if __name__ == "__main__":
    run_script(main)
