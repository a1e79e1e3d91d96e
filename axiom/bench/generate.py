"""`axiom bench generate`: `axiom.infer.generate` decoding at temperature 0 with EOS disabled, timed, by default on
the path that decoding on that device takes (`axiom.infer.engine.default_eager`): on CPU the eager fast path (the
dynamic cache and prepare_model's kernels), on CUDA the static cache and the compiled step, replayed as a CUDA graph.
With `vs_hf`, `transformers.LlamaForCausalLM` gets the same weights, prompts and new tokens through its default
`generate` (dynamic KV cache, SDPA attention; `hf_compile` gives it its static-cache compiled recipe); with a
llama.cpp folder, llama-bench times the same weights too (axiom/bench/llamacpp.py)."""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from axiom.bench.decode_profile import profile_decode
from axiom.bench.llamacpp import export_gguf, vs_llamacpp
from axiom.bench.reference import llama_like, seeded_model
from axiom.bench.timing import Bench, Contender, OwnPeak, interleaved, peak_memory, reset_peak, summary, sync
from axiom.config import Config, ModelConfig
from axiom.dtypes import BENCH_DTYPES, INFERENCE_DTYPES
from axiom.errors import AxiomError
from axiom.infer.engine import Engine, decoding_path
from axiom.infer.fast import prepare_model, weight_bytes_per_token
from axiom.infer.generate import stream
from axiom.model.cache import KVCache
from axiom.model.transformer import Axiom, flex_decoding, flops_per_token

PREFILL_LENGTHS = (32, 512)


@dataclass
class GenerateBench:
    """What to time: `rounds` generate calls of `batch` prompts of `prompt_len` random tokens and `new_tokens` new
    ones each, after `warmup` untimed calls."""

    rounds: int
    warmup: int
    seed: int  # of the weights and the prompts
    batch: int
    prompt_len: int
    new_tokens: int
    dtype: str  # one of BENCH_DTYPES: ours (int8 weight-only), the references' bfloat16 for int8
    eager: bool  # the dynamic cache in eager mode, else the static cache and the compiled step
    vs_hf: bool
    hf_compile: bool
    profile: bool  # where one decoding step's time goes (axiom/bench/decode_profile.py)


def default_dtype(device: torch.device) -> str:
    return "bfloat16" if device.type == "cuda" else "float32"


def check_generate(m: ModelConfig, s: GenerateBench) -> None:
    """One AxiomError for settings that cannot run, before anything is built."""
    if s.prompt_len + s.new_tokens > m.max_seq_len:
        raise AxiomError(
            f"--prompt-len {s.prompt_len} + --new-tokens {s.new_tokens} exceeds max_seq_len={m.max_seq_len}"
        )
    if s.dtype not in BENCH_DTYPES:
        raise AxiomError(f"--dtype {s.dtype!r}: choose one of {', '.join(BENCH_DTYPES)}")


class OurDecoding:
    """One timed unit of ours: `stream` over the prompts through one engine, whose caches and compiled step (CUDA
    graphs on a GPU) are built once, untimed. Keeps the last call's tokens, and each call's time to its first
    tokens (the prefill, warm: scripts/ttft.py times a cold start) and its decode-only rate."""

    def __init__(self, model: Axiom, prompts: torch.Tensor, new_tokens: int, eager: bool, device: torch.device):
        self.model, self.prompts, self.new_tokens, self.device = model, prompts, new_tokens, device
        self.engine = Engine(model, max_batch=len(prompts), compile=not eager)
        self.tokens: list[list[int]] = []
        self.decode_rates: list[float] = []
        self.first_token_s: list[float] = []

    def __call__(self) -> None:
        rows, n = [], self.new_tokens
        start = first = time.perf_counter()
        for i, ids in enumerate(stream(self.model, self.prompts.tolist(), n, temperature=0.0, engine=self.engine)):
            rows.append(ids)
            if i == 0:  # the first token comes out of the prefill: decoding is what follows
                sync(self.device)
                first = time.perf_counter()
                self.first_token_s.append(first - start)
        sync(self.device)
        if n > 1:
            self.decode_rates.append(len(self.prompts) * (n - 1) / (time.perf_counter() - first))
        self.tokens = torch.stack(rows, dim=1).tolist()


def bench_generate(cfg: Config, device: torch.device, s: GenerateBench, llamacpp: Path | None = None) -> Bench:
    """Decoding tokens/s of ours (and of the references asked for); `s` as `check_generate` accepts it."""
    m, n = cfg.model, s.new_tokens
    prompts = torch.randint(0, m.vocab_size, (s.batch, s.prompt_len), generator=torch.Generator().manual_seed(s.seed))
    model = seeded_model(m, s.seed).to(device).eval()
    if s.dtype in INFERENCE_DTYPES:
        prepare_model(model, s.dtype)
    else:
        cast_weights(model, torch.float16)
    ours = OurDecoding(model, prompts, n, s.eager, device)
    reset_peak(device)
    compared = s.vs_hf or llamacpp is not None  # a reference compares our tokens: one call first
    for _ in range(s.warmup if s.eager and not compared else max(s.warmup, 1)):  # compiling is never timed
        ours()
    peak = peak_memory(device)
    for times in (ours.decode_rates, ours.first_token_s):
        times.clear()
    # the references' copy of the weights, made again from the seed once ours is measured: not in our peak
    weights = seeded_model(m, s.seed).state_dict() if compared else None
    contenders = [Contender("axiom", ours, s.batch * n, 1)]
    extra = {}
    if s.vs_hf:
        theirs, extra = hf_contender(m, device, weights, prompts, s, ours.tokens)
        contenders.append(theirs)
    rates = interleaved(contenders, s.rounds, device)
    table, step = profile_decode(ours.engine, prompts.tolist()) if s.profile else (None, None)
    decode = statistics.median(ours.decode_rates) if ours.decode_rates else None
    figures = {
        **summary(rates, call_flops(m, s) / n, device),  # per counted (new) token: the prompts' prefill included
        "decode_tokens_per_s": decode,
        "first_token_ms": statistics.median(ours.first_token_s) * 1e3 if ours.first_token_s else None,
        "weight_bytes_per_token": weight_bytes_per_token(model),
        "peak_mem_bytes": peak,
        **extra,
        "batch": s.batch,
        "prompt_len": s.prompt_len,
        "new_tokens": n,
        "compile": not s.eager,
        "decoding": decoding_path(s.eager),
        # read after the warm-up: a flex step that did not compile has fallen back to SDPA (stop_flex_decoding)
        "flex_attention": not s.eager and flex_decoding(m, device),
        "hf_compile": s.hf_compile,
        "dtype": s.dtype,
    }
    if step is not None:
        figures["decode_step_profile"] = step
    if ours.decode_rates:  # the weights are read once a step, for every row of the batch
        figures["weight_gb_per_s"] = figures["weight_bytes_per_token"] * decode / s.batch / 1e9
    if llamacpp is not None:
        gguf = export_gguf(llamacpp, cfg, weights, s.dtype)
        del weights
        try:
            figures |= vs_llamacpp(llamacpp, gguf, our_rounds(ours, m, device), prefill_lengths(m), n, s.rounds)
        finally:
            shutil.rmtree(gguf.parent)
    return Bench(figures, table)


def call_flops(m: ModelConfig, s: GenerateBench) -> float:
    """Forward FLOPs of one generate call per prompt (a third of training's per token): the prefill of its prompt
    (causal: half the prompt attended on average; the output layer for its last position only) and the n - 1
    decoding steps after the first token."""
    unscored = (s.prompt_len - 1) * 6 * m.vocab_size * m.d_model  # prompt positions whose logits are not computed
    prefill = s.prompt_len * flops_per_token(m, s.prompt_len // 2) - unscored
    decoding = (s.new_tokens - 1) * flops_per_token(m, s.prompt_len + s.new_tokens // 2)
    return (prefill + decoding) / 3


def hf_contender(
    m: ModelConfig, device: torch.device, weights: dict, prompts: torch.Tensor, s: GenerateBench, ours: list
) -> tuple[Contender, dict]:
    """transformers' Llama with our weights decoding the same prompts, warmed up; its own peak memory (its weights,
    cache and activations), and the share of its tokens that are `ours`."""
    ref_dtype = torch.bfloat16 if s.dtype == "int8" else getattr(torch, s.dtype)  # the references' dtype
    ids, n = prompts.to(device), s.new_tokens
    options = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
    out: list[list[int]] = []
    with OwnPeak(device) as memory:
        hf = cast_weights(llama_like(m, device, weights).eval(), ref_dtype)
        if s.hf_compile:  # transformers' own recipe for compiled decoding
            options["cache_implementation"] = "static"
            hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)

        @torch.inference_mode()
        def theirs() -> None:
            result = hf.generate(ids, attention_mask=torch.ones_like(ids), **options)
            out[:] = result[:, s.prompt_len :].tolist()

        for _ in range(max(s.warmup, 1)):
            theirs()
    # Greedy decoding of the same weights: the tokens agree unless two logits tie within rounding.
    same = sum(a == b for x, y in zip(ours, out, strict=True) for a, b in zip(x, y, strict=True))
    extra = {"hf_peak_mem_bytes": memory.bytes, "same_tokens_as_hf": same / (len(out) * n)}
    return Contender("hf", theirs, s.batch * n, 1), extra


def our_rounds(ours: OurDecoding, m: ModelConfig, device: torch.device) -> Callable[[], dict[str, float]]:
    """One round of ours against llama-bench: a generate call's decode rate, then one prefill of each length."""

    def our_round() -> dict[str, float]:
        ours()
        rates = {"decode": ours.decode_rates.pop()} if ours.decode_rates else {}
        for length in prefill_lengths(m):
            rates[f"prefill_{length}"] = prefill_rate(ours.model, length, device)
        return rates

    return our_round


def prefill_lengths(m: ModelConfig) -> list[int]:
    return [length for length in PREFILL_LENGTHS if length <= m.max_seq_len]


@torch.inference_mode()
def prefill_rate(model: Axiom, length: int, device: torch.device) -> float:
    """Prompt tokens per second of one prefill of `length` random tokens into a fresh cache (batch 1)."""
    tokens = torch.randint(0, model.cfg.vocab_size, (1, length), device=device)
    dtype = next(model.parameters()).dtype
    cache = KVCache.empty(model.cfg, 1, length, device, dtype)
    sync(device)
    start = time.perf_counter()
    model(tokens, cache=cache, last_only=True)
    sync(device)
    return length / (time.perf_counter() - start)


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters to `dtype` (a tied table once); buffers such as RoPE tables keep their fp32 precision."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model
