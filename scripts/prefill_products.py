"""Float32 prompt products, GFLOP/s per row count: the decode kernels' register tiles (`axiom_decode.linear` above
FEW_ROWS rows), oneDNN's linear on the plain weight (`mkldnn._linear_pointwise`) and MKL's (`F.linear`), over every
linear weight of a preset (24 layers x 4 for axiom-380m) on 2 MB pages, as a prepared model holds them. The kinds
alternate within each round, so the VM's drifting bandwidth hits them alike. This is where `TILE_ROWS` comes from
(docs/benchmarks.md, "Float32 prompts in register tiles").

    python scripts/prefill_products.py --preset axiom-380m --rows 17,32,64,128,256,512 [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from axiom.config import PRESETS, get_config
from axiom.errors import run_script
from axiom.infer import kernels
from axiom.infer.fast import huge_page_buffer

PRODUCTS = {
    "tiles": lambda x, w: torch.ops.axiom_decode.linear(x, w),
    "onednn": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], ""),
    "mkl": F.linear,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="axiom-380m", choices=list(PRESETS))
    parser.add_argument("--rows", default="17,32,64,128,256,512", help="comma-separated prompt lengths")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not kernels.available():
        parser.error("the decode kernels cannot be built here (see the warning above)")
    if args.threads:
        torch.set_num_threads(args.threads)
    m = get_config(args.preset).model
    qkv = (m.n_heads + 2 * m.n_kv_heads) * m.head_dim
    shapes = [(qkv, m.d_model), (m.d_model, m.n_heads * m.head_dim), (2 * m.ffn_dim, m.d_model), (m.d_model, m.ffn_dim)]
    weights, offset = [], 0
    arena = huge_page_buffer(4 * m.n_layers * sum(n * k for n, k in shapes)).view(torch.float32)
    for _ in range(m.n_layers):
        for n, k in shapes:
            weights.append(arena[offset : offset + n * k].view(n, k).normal_(0, 0.02))
            offset += n * k
    row_lengths = [int(r) for r in args.rows.split(",")]
    rates: dict[int, dict[str, list[float]]] = {rows: {name: [] for name in PRODUCTS} for rows in row_lengths}
    with torch.inference_mode():
        for rows in row_lengths:  # warm-up: oneDNN builds a kernel for each shape at its first call
            for product in PRODUCTS.values():
                for w in weights[: len(shapes)]:
                    product(torch.randn(rows, w.shape[1]), w)
        for r in range(args.rounds):
            for rows in row_lengths:
                x = {k: torch.randn(rows, k) for _, k in shapes}
                for name, product in PRODUCTS.items() if r % 2 == 0 else reversed(PRODUCTS.items()):
                    start = time.perf_counter()
                    for w in weights:
                        product(x[w.shape[1]], w)
                    rates[rows][name].append(2 * offset * rows / (time.perf_counter() - start) / 1e9)
    medians = {rows: {name: statistics.median(v) for name, v in by.items()} for rows, by in rates.items()}
    print(f"{'rows':>5} " + " ".join(f"{name:>8}" for name in PRODUCTS) + "  GFLOP/s (median)   tiles/oneDNN")
    for rows, by in medians.items():
        figures = " ".join(f"{by[name]:8.0f}" for name in PRODUCTS)
        print(f"{rows:>5} {figures}  {by['tiles'] / by['onednn']:17.2f}x")
    print(json.dumps({"threads": torch.get_num_threads(), "rounds": rates, "median_gflops": medians}))


if __name__ == "__main__":
    run_script(main)
