"""Time to first token of a cold start: a fresh process builds a preset (random weights) or loads a checkpoint,
runs `axiom.infer.fast.prepare_model`, and decodes through `axiom.infer.generate.stream` (what `axiom generate` runs).

    python scripts/ttft.py --preset axiom-380m --dtype bfloat16 [--compile] [--cache-dir DIR] [--ckpt DIR] [--device D]

Prints one JSON line: seconds to a ready model (build or load + prepare), to the first token (prefill), to the
second (the first decoding step: where a compiled step compiles, or loads from inductor's caches), and the
decode tokens/s after that. With --compile, inductor's caches live in --cache-dir (TORCHINDUCTOR_CACHE_DIR): an
empty folder gives the first run on a machine, the same folder again a later run. The decode kernels' one-time
build is outside these figures unless their folder (TORCH_EXTENSIONS_DIR) is empty too.
"""

from __future__ import annotations

import argparse
import json
import os
import time

START = time.perf_counter()


def main() -> None:
    from axiom.config import PRESETS  # after START: the imports are part of a cold start

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="axiom-380m", choices=list(PRESETS))
    parser.add_argument("--ckpt", default=None, help="a checkpoint instead of the preset's random weights")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: a GPU if there is one)")
    parser.add_argument("--compile", action="store_true", help="decode with the compiled static-cache step")
    parser.add_argument("--cache-dir", default=None, help="TORCHINDUCTOR_CACHE_DIR for --compile")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32, help="at least 3: the rate after the second token")
    args = parser.parse_args()
    if args.prompt_len < 1 or args.new_tokens < 3:
        parser.error("--prompt-len must be at least 1 and --new-tokens at least 3")
    if args.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir  # read when inductor first compiles
    import torch

    from axiom.config import get_config
    from axiom.errors import AxiomError
    from axiom.infer.fast import prepare_model
    from axiom.infer.generate import stream
    from axiom.model.checkpoint import load_model
    from axiom.model.transformer import Axiom
    from axiom.runtime import pick_device

    imported = time.perf_counter()
    torch.manual_seed(0)
    try:
        device = pick_device(args.device)
        model = load_model(args.ckpt, device)[0] if args.ckpt else Axiom(get_config(args.preset).model).to(device)
        prepare_model(model, args.dtype)
    except AxiomError as e:
        parser.error(str(e))
    if args.prompt_len + args.new_tokens > model.cfg.max_seq_len:
        parser.error(
            f"--prompt-len + --new-tokens: {args.prompt_len + args.new_tokens} exceeds the context of "
            f"{model.cfg.max_seq_len} tokens"
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
    ready = time.perf_counter()
    prompt = torch.randint(0, model.cfg.vocab_size, (args.prompt_len,)).tolist()
    marks = []
    for _ in stream(model, [prompt], args.new_tokens, temperature=0.0, compile=args.compile):
        marks.append(time.perf_counter())
    print(
        json.dumps(
            {
                "device": str(device),
                "dtype": args.dtype,
                "compile": args.compile,
                "import_s": imported - START,
                "model_ready_s": ready - imported,
                "first_token_s": marks[0] - ready,
                "second_token_s": marks[1] - ready,
                "decode_tokens_per_s_after": (len(marks) - 2) / (marks[-1] - marks[1]),
                "process_to_first_token_s": marks[0] - START,
                "process_to_second_token_s": marks[1] - START,
            }
        )
    )


if __name__ == "__main__":
    main()
