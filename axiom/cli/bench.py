"""`axiom bench train|generate|loss`: our training step or decoding, timed, optionally beside transformers' Llama
(`--vs-hf`) or llama.cpp (`--vs-llamacpp`), or the training loss through each loss kernel beside the plain one;
axiom/bench/ does the timing.

`--json` prints one object: tokens_per_s, mfu (null without a known peak: CPU), peak_mem_bytes (CUDA max
allocated, or process peak RSS on CPU, taken before the reference model exists), achieved_tflops, per-round
figures and versions; plus hf_tokens_per_s, ratio_vs_hf, hf_peak_mem_bytes and a parity check with --vs-hf. generate
says which path it timed (`decoding`: eager by default on CPU, compiled on CUDA) and with --profile adds
`decode_step_profile` (axiom/bench/decode_profile.py). loss prints per kernel its time, tokens/s, peak memory above
its inputs and agreement with the plain loss (axiom/bench/loss.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TypeVar

import torch

from axiom.bench import llamacpp
from axiom.bench.generate import GenerateBench, bench_generate, check_generate, default_dtype
from axiom.bench.loss import LossBench, bench_loss
from axiom.bench.timing import Bench, versions
from axiom.bench.train import TrainBench, bench_train
from axiom.cli.args import (
    add_config_arguments,
    add_decoding_path_arguments,
    add_device_argument,
    config_file,
    config_from_args,
    eager_decoding,
    preset_of,
)
from axiom.config import Config
from axiom.dtypes import BENCH_DTYPES, describe, dtype_name
from axiom.errors import AxiomError, require_installed
from axiom.runtime import pick_device

T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    train = sub.add_parser("train", help="optimizer steps per second of a preset (tokens/s, TFLOP/s, MFU, memory)")
    gen = sub.add_parser("generate", help="decoding tokens per second with the KV cache")
    for p in (train, gen):
        add_config_arguments(p)
        add_device_argument(p)
        p.add_argument("--vs-hf", action="store_true", help="also time transformers.LlamaForCausalLM and compare")
        p.add_argument("--rounds", type=int, default=3, help="timed rounds per model, interleaved (default: 3)")
        p.add_argument("--seed", type=int, default=0, help="seed of the weights and synthetic token ids")
        p.add_argument(
            "--profile",
            action="store_true",
            help="print a torch.profiler table of one of our runs (generate: of decoding steps, and where one step's "
            "time goes: host, device waits, kernels and launches)",
        )
        p.add_argument(
            "--threads", type=int, default=None, help="CPU threads of both models (default: torch's, one per core)"
        )
        p.add_argument("--json", action="store_true", help="print one JSON object")
    train.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps per model first, at least one (its loss: first_loss; default: 2)",
    )
    train.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round (default: 3)")
    _add_generate_arguments(gen)
    _add_loss_arguments(sub)


def _add_loss_arguments(sub: argparse._SubParsersAction) -> None:
    loss = sub.add_parser(
        "loss", help="the training loss alone through each loss kernel the device runs, beside the plain loss"
    )
    add_config_arguments(loss)
    add_device_argument(loss)
    loss.add_argument(
        "--rows", type=int, default=None, help="tokens per call (default: 16384 on CUDA, a micro-batch of 16; 1024)"
    )
    loss.add_argument("--rounds", type=int, default=3, help="timed rounds, interleaved (default: 3)")
    loss.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed calls per kernel first, at least one (the first, alone: its peak memory and values; default: 1)",
    )
    loss.add_argument("--units", type=int, default=3, help="timed calls per kernel and round (default: 3)")
    loss.add_argument("--seed", type=int, default=0, help="seed of the synthetic hidden states, table and targets")
    loss.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    loss.add_argument("--json", action="store_true", help="print one JSON object")


def _add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--warmup", type=int, default=1, help="untimed generate calls per model first (default: 1)")
    gen.add_argument("--batch", type=int, default=1, help="prompts decoded together (default: 1)")
    gen.add_argument("--prompt-len", type=int, default=32, help="prompt tokens, prefilled (default: 32)")
    gen.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    add_decoding_path_arguments(gen)
    gen.add_argument(
        "--hf-compile",
        action="store_true",
        help="give transformers its own compiled recipe too (static cache, forward compiled with "
        "mode='reduce-overhead') instead of its default generate",
    )
    gen.add_argument(
        "--dtype",
        default=None,
        type=dtype_name,  # either spelling, as every --dtype
        metavar="DTYPE",
        help=f"weights and KV cache: {describe(BENCH_DTYPES)}; int8 is ours weight-only (axiom.infer.fast."
        "prepare_model; the references run bfloat16, llama.cpp q8_0), float16 is for GPUs; default: bfloat16 on "
        "CUDA, float32 on CPU; RoPE tables stay fp32",
    )
    gen.add_argument(
        "--vs-llamacpp",
        action="store_true",
        help="also export the same weights through llama.cpp's converter and time its llama-bench in the same run: "
        "decode tok/s and prefill of 32 and 512 tokens, both and the ratio (skipped with one line where llama.cpp "
        "is absent)",
    )
    gen.add_argument(
        "--llamacpp-dir",
        default=None,
        help="llama.cpp folder with bin/llama-bench and convert (default: "
        f"{llamacpp.DEFAULT_LLAMACPP or '../shared/tools/llama.cpp beside a checkout'})",
    )


def run(args: argparse.Namespace) -> None:
    for name in ("rounds", "warmup", "steps", "batch", "prompt_len", "new_tokens", "threads", "rows", "units"):
        value = getattr(args, name, None)
        # train's first warm-up step gives first_loss, loss's first call the peak memory and values
        least = 0 if name == "warmup" and args.what == "generate" else 1
        if value is not None and value < least:
            raise AxiomError(f"--{name.replace('_', '-')}={value} must be at least {least}")
    if getattr(args, "vs_hf", False):  # before ours is timed; imported after, not to count in our peak memory
        require_installed("transformers", "--vs-hf", "axiom-lm[hf]")
    cfg = config_from_args(args)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "train":
        bench = bench_train(cfg, device, settings(TrainBench, args))
    elif args.what == "loss":
        rows = args.rows or (16_384 if device.type == "cuda" else 1024)
        bench = bench_loss(cfg, device, settings(LossBench, args, rows=rows))
    else:
        bench = run_generate(cfg, device, args)
    if bench.profile:
        print(bench.profile, file=sys.stderr)
    source = {"preset": preset_of(args, config_file(args)), **({"config": args.config} if args.config else {})}
    result = {"what": args.what, **source, "overrides": args.overrides, **bench.figures}
    result |= versions(device)
    if args.json:
        print(json.dumps(result))
    elif args.what == "loss":
        _print_loss(result)
    else:
        _print_human(result)


def settings(cls: type[T], args: argparse.Namespace, **given) -> T:
    """A settings dataclass from the flags of the same names (and `given` values)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in given}, **given)


def run_generate(cfg: Config, device: torch.device, args: argparse.Namespace) -> Bench:
    """bench generate, with llama.cpp where --vs-llamacpp finds it (one line on stderr where the default is absent)."""
    eager = eager_decoding(args, device)
    s = settings(GenerateBench, args, dtype=args.dtype or default_dtype(device), eager=eager)
    check_generate(cfg.model, s)
    for flag, partner in (("hf_compile", "vs_hf"), ("llamacpp_dir", "vs_llamacpp")):
        if getattr(args, flag) and not getattr(args, partner):
            raise AxiomError(f"--{flag.replace('_', '-')} goes with --{partner.replace('_', '-')}, which is not given")
    if args.vs_llamacpp and s.batch != 1:  # llama-bench decodes one sequence
        raise AxiomError(f"--vs-llamacpp compares one sequence's decoding (llama-bench's): --batch 1, not {s.batch}")
    folder = llamacpp.find_llamacpp(args.llamacpp_dir) if args.vs_llamacpp else None
    if args.vs_llamacpp and folder is None:
        print(
            f"axiom bench: llama.cpp not found at {llamacpp.DEFAULT_LLAMACPP or '../shared beside a checkout'}: "
            "--vs-llamacpp skipped (--llamacpp-dir DIR names one)",
            file=sys.stderr,
        )
    return bench_generate(cfg, device, s, folder)


def _print_human(r: dict) -> None:
    unit = "optimizer steps" if r["what"] == "train" else "generate calls"
    source = f"--preset {r['preset']}" + (f" --config {r['config']}" if "config" in r else "")
    print(f"axiom bench {r['what']} {source} on {r['device']} (torch {r['torch']}), rounds of {unit}")
    if "decoding" in r:
        attention = ", attention through flex_attention" if r["flex_attention"] else ""
        print(f"  decoding      {r['decoding']}, {r['dtype']}, batch {r['batch']}{attention}")
    print(f"  axiom         {r['tokens_per_s']:>12,.0f} tokens/s   {r['achieved_tflops']:.4f} TFLOP/s", end="")
    print(f"   MFU {r['mfu']:.1%}" if r["mfu"] is not None else "   MFU n/a (no known peak)")
    if "hf_tokens_per_s" in r:
        print(f"  transformers  {r['hf_tokens_per_s']:>12,.0f} tokens/s   ratio {r['ratio_vs_hf']:.2f}x")
    if r.get("decode_tokens_per_s"):
        gbs = r.get("weight_gb_per_s")
        print(f"  decode only   {r['decode_tokens_per_s']:>12,.1f} tokens/s   {r['dtype']}", end="")
        weights = r["weight_bytes_per_token"] / 1e9
        print(f"   {weights:.2f} GB of weights per decoding step, {gbs:.1f} GB/s" if gbs else "")
    if r.get("first_token_ms") is not None:
        print(f"  first tokens  {r['first_token_ms']:>12,.1f} ms (prefill of {r['batch']} x {r['prompt_len']}, warm)")
    if "ratio_vs_llamacpp" in r:
        ours, theirs = r["ours_vs_llamacpp_tokens_per_s"], r["llamacpp"]["tokens_per_s"]
        print(f"  vs llama.cpp ({r['llamacpp']['gguf_type']}, {r['llamacpp']['threads']} threads), tokens/s:")
        for key, ratio in r["ratio_vs_llamacpp"].items():
            print(f"    {key:12s} ours {ours[key]:>10,.1f}   llama.cpp {theirs[key]:>10,.1f}   ratio {ratio:.2f}x")
    if "decode_step_profile" in r:
        _print_step_profile(r["decode_step_profile"])
    mem = r["peak_mem_bytes"]
    print(f"  peak memory   {mem / 2**20:>12,.0f} MiB" if mem is not None else "  peak memory   n/a")
    if r.get("hf_peak_mem_bytes") is not None:
        print(f"  hf peak mem   {r['hf_peak_mem_bytes'] / 2**20:>12,.0f} MiB")


def _print_loss(r: dict) -> None:
    print(
        f"axiom bench loss --preset {r['preset']} on {r['device']} (torch {r['torch']}): {r['rows']:,} tokens x "
        f"{r['vocab_size']:,} columns x d_model {r['d_model']}, {r['dtype']}, forward and backward"
    )
    for kernel, k in r["kernels"].items():
        mem = k["peak_extra_bytes"]
        speed = f"{k['ms']:>10.2f} ms {k['tokens_per_s']:>12,.0f} tokens/s {k['speedup_vs_plain']:>6.2f}x plain"
        memory = f"peak +{mem / 2**20:,.0f} MiB" if mem is not None else "peak n/a"
        diffs = f"gradients {k['grad_hidden_rel_diff']:.1e} / {k['grad_weight_rel_diff']:.1e} from plain's"
        print(f"  {kernel:8s}{speed}   {memory}   loss {k['loss']:.5f}, {diffs}")
    for kernel, why in r["skipped"].items():
        print(f"  {kernel:8s} skipped: {why}")


def _print_step_profile(p: dict) -> None:
    print(
        f"  decode step   {p['step_ms']:>12.3f} ms ({p['steps']} steps); profiled {p['profiled_step_ms']:.3f} ms: ",
        end="",
    )
    print(f"{p['host_ms']:.3f} in ops, {p['wait_ms']:.3f} waiting for the device, {p['python_ms']:.3f} in Python")
    if "kernels" in p:
        print(
            f"    on the device {p['kernel_ms']:.3f} ms in {p['kernels']:.0f} kernels, from {p['kernel_launches']:.0f} "
            f"kernel launches and {p['graph_launches']:.0f} CUDA graph launches"
        )
