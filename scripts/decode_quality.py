"""Perplexity of a checkpoint after `axiom.infer.fast.prepare_model` in each inference dtype, on the val split of
prepared data: what bfloat16 and weight-only int8 cost in quality (docs/benchmarks.md, "Decoding at the bandwidth
limit").

    python scripts/decode_quality.py --ckpt RUN/checkpoints/best --data PREPARED [--eval-tokens N]

Each dtype evaluates a fresh copy of the checkpoint through `axiom.eval.loss.evaluate` (the loss path: the
prepared linears' many-row forward, and the dequantized table for the output layer), on the same fixed windows.
"""

from __future__ import annotations

import argparse
import json

from axiom.dtypes import INFERENCE_DTYPES
from axiom.errors import run_script
from axiom.eval.loss import evaluate
from axiom.infer.fast import prepare_model
from axiom.model.checkpoint import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory")
    parser.add_argument("--data", required=True, help="prepared data directory (its val split is evaluated)")
    parser.add_argument("--eval-tokens", type=int, default=65_536, help="val tokens (default: 65,536)")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    rows = {}
    for dtype in INFERENCE_DTYPES:
        model, cfg, _ = load_model(args.ckpt)
        prepare_model(model, dtype)
        r = evaluate(model, args.data, cfg.eval_seq_len, args.batch_size, args.eval_tokens)
        rows[dtype] = {"loss": r.loss, "ppl": r.ppl, "bpb": r.bpb, "tokens": r.tokens}
        change = r.ppl / rows["float32"]["ppl"] - 1
        print(f"{dtype:9s} loss {r.loss:.4f}  ppl {r.ppl:9.3f} ({change:+.2%} vs float32)  bpb {r.bpb:.4f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    run_script(main)
