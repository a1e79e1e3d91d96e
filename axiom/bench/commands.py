"""`axiom bench train|generate`: our training step or decoding, timed, optionally beside transformers' Llama.

`train` times `axiom.train.trainer.train_step` (the training loop's own step: forward, backward, clipping, optimizer)
on synthetic token ids. `generate` times `axiom.infer.generate.generate` at temperature 0 with EOS disabled, by
default with the static cache and the compiled decoding step (`--eager`: the dynamic cache, no compilation).
With `--vs-hf`, `transformers.LlamaForCausalLM` gets the same shapes, dtype, weights, batch, optimizer and loss
(or prompt and new tokens, via its default `generate`: dynamic KV cache, SDPA attention; `--hf-compile` gives
it its static-cache compiled recipe) and is timed the same way in the same process. Rounds alternate
ours-first and theirs-first so that load from other processes falls on both; throughput is the median over
rounds, the ratio ours / theirs of the medians.

`--json` prints one object: tokens_per_s, mfu (null without a known peak: CPU), peak_mem_bytes (CUDA max
allocated, or process peak RSS on CPU, taken before the reference model exists), achieved_tflops, per-round
figures and versions; plus hf_tokens_per_s, ratio_vs_hf, hf_peak_mem_bytes and a parity check with --vs-hf.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from axiom.cli.args import add_config_arguments, add_device_argument, config_from_args
from axiom.config import Config, ModelConfig
from axiom.dtypes import BENCH_DTYPES, INFERENCE_DTYPES, short_name
from axiom.errors import AxiomError
from axiom.infer.engine import Engine
from axiom.infer.fast import prepare_model, weight_bytes_per_token
from axiom.infer.generate import stream
from axiom.model.cache import KVCache
from axiom.model.transformer import EMBED, Axiom, flops_per_token, num_params, retie
from axiom.runtime import gpu_peak_flops, pick_device
from axiom.train.optim import build_optimizer, lr_at
from axiom.train.parallel import Dist, parallelize
from axiom.train.trainer import train_step

# prebuilt llama.cpp beside the repository (../shared/tools/llama.cpp, see its README), absent on a fresh clone
DEFAULT_LLAMACPP = Path(__file__).resolve().parents[3] / "shared" / "tools" / "llama.cpp"


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
        p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one of our runs")
        p.add_argument(
            "--threads", type=int, default=None, help="CPU threads of both models (default: torch's, one per core)"
        )
        p.add_argument("--json", action="store_true", help="print one JSON object")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default: 2)")
    train.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round (default: 3)")
    gen.add_argument("--warmup", type=int, default=1, help="untimed generate calls per model first (default: 1)")
    gen.add_argument("--batch", type=int, default=1, help="prompts decoded together (default: 1)")
    gen.add_argument("--prompt-len", type=int, default=32, help="prompt tokens, prefilled (default: 32)")
    gen.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    gen.add_argument(
        "--eager",
        action="store_true",
        help="decode with the dynamic cache in eager mode (`axiom generate`'s default) instead of the static cache "
        "and the torch.compile'd step (CUDA graphs on GPU)",
    )
    gen.add_argument(
        "--hf-compile",
        action="store_true",
        help="give transformers its own compiled recipe too (static cache, forward compiled with "
        "mode='reduce-overhead') instead of its default generate",
    )
    gen.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16, int8 (ours weight-only int8 via axiom.infer.fast.prepare_model; the references "
        "run bfloat16, llama.cpp q8_0) or float16 (GPU): weights and KV cache (default: bfloat16 on CUDA, float32 on "
        "CPU); RoPE tables stay fp32",
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
        help=f"llama.cpp folder with bin/llama-bench and convert (default: {DEFAULT_LLAMACPP})",
    )


def run(args: argparse.Namespace) -> None:
    for name in ("rounds", "warmup", "steps", "batch", "prompt_len", "new_tokens", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise AxiomError(f"--{name.replace('_', '-')}={value} must be positive")
    cfg = config_from_args(args)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_train(cfg, device, args) if args.what == "train" else bench_generate(cfg, device, args)
    result = {"what": args.what, "preset": args.preset, "overrides": args.overrides, **result, **_versions(device)}
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(result)


# ---- timing


@dataclass
class Contender:
    name: str
    run: Callable[[], None]  # one timed unit: an optimizer step, or one generate call
    tokens: int  # tokens per unit
    units: int  # units per round


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(contenders: list[Contender], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Tokens/s of each contender per round; the order flips every round (ABBA) to cancel drift."""
    rates = {c.name: [] for c in contenders}
    for r in range(rounds):
        for c in contenders if r % 2 == 0 else contenders[::-1]:
            _sync(device)
            start = time.perf_counter()
            for _ in range(c.units):
                c.run()
            _sync(device)
            rates[c.name].append(c.tokens * c.units / (time.perf_counter() - start))
    return rates


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device, since_reset: bool = False) -> int | None:
    """CUDA max allocated bytes, or the process's peak RSS on CPU (getrusage; VmHWM after a reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if since_reset:
        try:
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024
        except (OSError, StopIteration):
            return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def _profile(fn: Callable[[], None]) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)


def _summary(rates: dict[str, list[float]], flops: float, device: torch.device) -> dict:
    ours = statistics.median(rates["axiom"])
    peak = gpu_peak_flops(device)
    out = {
        "tokens_per_s": ours,
        "achieved_tflops": ours * flops / 1e12,
        "mfu": ours * flops / peak if peak else None,
        "rounds_tokens_per_s": rates["axiom"],
    }
    if "hf" in rates:
        theirs = statistics.median(rates["hf"])
        out |= {"hf_tokens_per_s": theirs, "ratio_vs_hf": ours / theirs, "hf_rounds_tokens_per_s": rates["hf"]}
    return out


# ---- the reference model


def llama_like(m: ModelConfig, device: torch.device, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' Llama with our shapes (tied embeddings, no biases, SDPA attention) and our weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    from axiom.interop.hf.names import LLAMA_NAMES, to_llama

    logging.set_verbosity_error()  # no notes about generation flags on every call
    config = LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        intermediate_size=m.ffn_dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads,
        head_dim=m.head_dim,
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        max_position_embeddings=m.max_seq_len,
        tie_word_embeddings=m.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=m.dropout,
        bos_token_id=None,
        eos_token_id=None,  # EOS disabled: every run generates exactly the tokens asked for
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        hf = LlamaForCausalLM(config)
    llama = retie(to_llama(weights, m), m.tie_embeddings, LLAMA_NAMES[EMBED][0])
    missing, unexpected = hf.load_state_dict(llama, strict=False)
    if missing or unexpected:
        raise AxiomError(f"reference Llama does not fit: missing {missing}, unexpected {unexpected}")
    return hf


class LlamaLoss(torch.nn.Module):
    """A Llama behind our call signature, model(x, y) -> mean cross-entropy of predicting y, so that the one
    `train_step` drives both models. `shift_labels` makes transformers use y as given (x and y are already
    shifted by one), so both losses cover the same tokens."""

    def __init__(self, hf: torch.nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss


# ---- train


def bench_train(cfg: Config, device: torch.device, args: argparse.Namespace) -> dict:
    m, t = cfg.model, cfg.train
    if t.seq_len > m.max_seq_len:
        raise AxiomError(f"seq_len={t.seq_len} exceeds max_seq_len={m.max_seq_len}; lower it with --set seq_len=N")
    torch.manual_seed(args.seed)
    tokens = torch.randint(0, m.vocab_size, (t.grad_accum_steps, t.micro_batch_size, t.seq_len + 1))
    batches = [(row[:, :-1].contiguous().to(device), row[:, 1:].contiguous().to(device)) for row in tokens]

    model = Axiom(m).to(device)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()} if args.vs_hf else None
    model = parallelize(model, t, device, Dist())
    optimizer, opt_name = build_optimizer(model, t, device)
    step = [0]

    def ours() -> None:
        train_step(model, optimizer, batches, lr_at(step[0], t), t)
        step[0] += 1

    _reset_peak(device)
    first = train_step(model, optimizer, batches, lr_at(0, t), t).loss
    for _ in range(args.warmup - 1):
        ours()
    peak = peak_memory(device)  # before the reference exists: ours alone
    contenders = [Contender("axiom", ours, t.tokens_per_step, args.steps)]
    extra = {}
    if args.vs_hf:
        hf = LlamaLoss(llama_like(m, device, weights))
        if t.gradient_checkpointing:  # newer transformers renamed gradient_checkpointing_enable
            getattr(hf.hf, "activation_checkpointing_enable", hf.hf.gradient_checkpointing_enable)()
        if t.compile:
            hf.compile()
        hf.train()
        hf_opt, _ = build_optimizer(hf, t, device)
        hf_step = [0]

        def theirs() -> None:
            train_step(hf, hf_opt, batches, lr_at(hf_step[0], t), t)
            hf_step[0] += 1

        model.loss_workspace.release()  # our kept loss block is not the reference's memory
        _reset_peak(device)
        hf_first = train_step(hf, hf_opt, batches, lr_at(0, t), t).loss
        for _ in range(args.warmup - 1):
            theirs()
        extra = {
            "hf_peak_mem_bytes": peak_memory(device, since_reset=True),
            "hf_first_loss": hf_first,
            "hf_params": sum(p.numel() for p in hf.parameters()),
        }
        contenders.append(Contender("hf", theirs, t.tokens_per_step, args.steps))
    rates = interleaved(contenders, args.rounds, device)
    if args.profile:
        _profile(ours)
    return {
        **_summary(rates, flops_per_token(m, t.seq_len), device),
        "peak_mem_bytes": peak,
        "first_loss": first,
        "params": num_params(m),
        **extra,
        "tokens_per_step": t.tokens_per_step,
        "micro_batch_size": t.micro_batch_size,
        "seq_len": t.seq_len,
        "grad_accum_steps": t.grad_accum_steps,
        "optimizer": opt_name,
        "dtype": t.dtype if device.type == "cuda" else "float32",
        "compile": t.compile,
        "gradient_checkpointing": t.gradient_checkpointing,
        "steps_per_round": args.steps,
    }


# ---- generate


PREFILL_LENGTHS = (32, 512)


def bench_generate(cfg: Config, device: torch.device, args: argparse.Namespace) -> dict:
    m = cfg.model
    if args.prompt_len + args.new_tokens > m.max_seq_len:
        raise AxiomError(
            f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds max_seq_len={m.max_seq_len}"
        )
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in BENCH_DTYPES:
        raise AxiomError(f"--dtype {dtype_name!r}: choose one of {', '.join(BENCH_DTYPES)}")
    llamacpp = find_llamacpp(args.llamacpp_dir) if args.vs_llamacpp else None
    torch.manual_seed(args.seed)
    prompts = torch.randint(0, m.vocab_size, (args.batch, args.prompt_len))
    model = Axiom(m).to(device).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()} if args.vs_hf or llamacpp else None
    if dtype_name in INFERENCE_DTYPES:
        prepare_model(model, dtype_name)
    else:
        cast_weights(model, torch.float16)
    ref_dtype = torch.bfloat16 if dtype_name == "int8" else getattr(torch, dtype_name)  # the references' dtype
    n = args.new_tokens
    out: dict[str, list[list[int]]] = {}
    decode_rates: list[float] = []

    # One engine for every call: its caches and compiled step (CUDA graphs on a GPU) are built once, untimed.
    engine = Engine(model, max_batch=args.batch, compile=not args.eager)

    def ours() -> None:
        rows, first = [], 0.0
        for i, ids in enumerate(stream(model, prompts.tolist(), n, temperature=0.0, engine=engine)):
            rows.append(ids)
            if i == 0:  # the first token comes out of the prefill: decoding is what follows
                _sync(device)
                first = time.perf_counter()
        _sync(device)
        if n > 1:
            decode_rates.append(args.batch * (n - 1) / (time.perf_counter() - first))
        out["axiom"] = torch.stack(rows, dim=1).tolist()

    _reset_peak(device)
    for _ in range(args.warmup if args.eager else max(args.warmup, 1)):  # compiling is never timed
        ours()
    peak = peak_memory(device)
    decode_rates.clear()
    contenders = [Contender("axiom", ours, args.batch * n, 1)]
    extra = {}
    if args.vs_hf:
        hf = cast_weights(llama_like(m, device, weights).eval(), ref_dtype)
        ids = prompts.to(device)
        options = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        if args.hf_compile:  # transformers' own recipe for compiled decoding
            options["cache_implementation"] = "static"
            hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)

        @torch.inference_mode()
        def theirs() -> None:
            result = hf.generate(ids, attention_mask=torch.ones_like(ids), **options)
            out["hf"] = result[:, args.prompt_len :].tolist()

        _reset_peak(device)
        for _ in range(max(args.warmup, 1)):
            theirs()
        # Greedy decoding of the same weights: the tokens agree unless two logits tie within rounding.
        same = sum(a == b for x, y in zip(out["axiom"], out["hf"], strict=True) for a, b in zip(x, y, strict=True))
        extra = {
            "hf_peak_mem_bytes": peak_memory(device, since_reset=True),
            "same_tokens_as_hf": same / (len(out["hf"]) * n),
        }
        contenders.append(Contender("hf", theirs, args.batch * n, 1))
    rates = interleaved(contenders, args.rounds, device)
    if args.profile:
        _profile(ours)
    context = args.prompt_len + n // 2  # mean attention span of a decoded token
    result = {
        **_summary(rates, flops_per_token(m, context) / 3, device),  # forward only: a third of training's
        "decode_tokens_per_s": statistics.median(decode_rates) if decode_rates else None,
        "weight_bytes_per_token": weight_bytes_per_token(model),
        "peak_mem_bytes": peak,
        **extra,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": n,
        "compile": not args.eager,
        "hf_compile": args.hf_compile,
        "dtype": dtype_name,
    }
    if decode_rates:
        result["weight_gb_per_s"] = result["weight_bytes_per_token"] * result["decode_tokens_per_s"] / 1e9
    if llamacpp is not None:

        def our_round() -> dict[str, float]:
            ours()
            rates = {"decode": decode_rates.pop()} if decode_rates else {}
            for length in prefill_lengths(m):
                rates[f"prefill_{length}"] = prefill_rate(model, length, device)
            return rates

        gguf = export_gguf(llamacpp, cfg, weights, dtype_name)
        del weights
        try:
            result |= vs_llamacpp(llamacpp, gguf, our_round, prefill_lengths(m), n, args.rounds)
        finally:
            shutil.rmtree(gguf.parent)
    return result


def prefill_lengths(m: ModelConfig) -> list[int]:
    return [length for length in PREFILL_LENGTHS if length <= m.max_seq_len]


@torch.inference_mode()
def prefill_rate(model: Axiom, length: int, device: torch.device) -> float:
    """Prompt tokens per second of one prefill of `length` random tokens into a fresh cache (batch 1)."""
    tokens = torch.randint(0, model.cfg.vocab_size, (1, length), device=device)
    dtype = next(model.parameters()).dtype
    cache = KVCache.empty(model.cfg, 1, length, device, dtype)
    _sync(device)
    start = time.perf_counter()
    model(tokens, cache=cache, last_only=True)
    _sync(device)
    return length / (time.perf_counter() - start)


# ---- llama.cpp


def find_llamacpp(folder: str | None) -> Path | None:
    """The llama.cpp folder (bin/llama-bench and convert), or None, said in one line, where the default is absent."""
    root = Path(folder) if folder else DEFAULT_LLAMACPP
    if (root / "bin" / "llama-bench").is_file() and (root / "convert").is_file():
        return root
    if folder:
        raise AxiomError(f"--llamacpp-dir {folder}: no bin/llama-bench and convert there")
    print(f"axiom bench: llama.cpp not found at {root}: --vs-llamacpp skipped", file=sys.stderr)
    return None


def export_gguf(llamacpp: Path, cfg: Config, weights: dict[str, torch.Tensor], dtype_name: str) -> Path:
    """`weights` as a GGUF file of llama.cpp's type nearest `dtype_name`, through our `--format llama` export and
    llama.cpp's own converter; returned in a temporary folder (the caller removes the file)."""
    from axiom.interop.export import export
    from axiom.model.checkpoint import save_weights

    out = Path(tempfile.mkdtemp(prefix="axiom-bench-")) / f"model-{short_name(dtype_name)}.gguf"
    with tempfile.TemporaryDirectory(prefix="axiom-bench-") as tmp:
        ckpt = Path(tmp) / "ckpt"
        ckpt.mkdir()
        save_weights(weights, cfg, ckpt)
        hf = export(ckpt, Path(tmp) / "hf", fmt="llama", dtype="bfloat16" if dtype_name == "bfloat16" else "float32")
        shutil.rmtree(ckpt)
        cmd = [str(llamacpp / "convert"), sys.executable, str(hf), str(out), short_name(dtype_name)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        out.parent.rmdir()
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise AxiomError(f"llama.cpp's converter failed ({last}); it needs transformers and sentencepiece")
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


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters to `dtype` (a tied table once); buffers such as RoPE tables keep their fp32 precision."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


# ---- output


def _versions(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def _print_human(r: dict) -> None:
    unit = "optimizer steps" if r["what"] == "train" else "generate calls"
    print(f"axiom bench {r['what']} --preset {r['preset']} on {r['device']} (torch {r['torch']}), rounds of {unit}")
    print(f"  axiom         {r['tokens_per_s']:>12,.0f} tokens/s   {r['achieved_tflops']:.4f} TFLOP/s", end="")
    print(f"   MFU {r['mfu']:.1%}" if r["mfu"] is not None else "   MFU n/a (no known peak)")
    if "hf_tokens_per_s" in r:
        print(f"  transformers  {r['hf_tokens_per_s']:>12,.0f} tokens/s   ratio {r['ratio_vs_hf']:.2f}x")
    if r.get("decode_tokens_per_s"):
        gbs = r.get("weight_gb_per_s")
        print(f"  decode only   {r['decode_tokens_per_s']:>12,.1f} tokens/s   {r['dtype']}", end="")
        print(f"   {r['weight_bytes_per_token'] / 1e9:.2f} GB of weights per token, {gbs:.1f} GB/s" if gbs else "")
    if "ratio_vs_llamacpp" in r:
        ours, theirs = r["ours_vs_llamacpp_tokens_per_s"], r["llamacpp"]["tokens_per_s"]
        print(f"  vs llama.cpp ({r['llamacpp']['gguf_type']}, {r['llamacpp']['threads']} threads), tokens/s:")
        for key, ratio in r["ratio_vs_llamacpp"].items():
            print(f"    {key:12s} ours {ours[key]:>10,.1f}   llama.cpp {theirs[key]:>10,.1f}   ratio {ratio:.2f}x")
    mem = r["peak_mem_bytes"]
    print(f"  peak memory   {mem / 2**20:>12,.0f} MiB" if mem is not None else "  peak memory   n/a")
    if r.get("hf_peak_mem_bytes") is not None:
        print(f"  hf peak mem   {r['hf_peak_mem_bytes'] / 2**20:>12,.0f} MiB")
