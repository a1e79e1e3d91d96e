"""What a training configuration amounts to on a device, without building it: parameters, tokens, FLOPs, memory,
the settings left to the device (`micro_batch_size`, `gradient_checkpointing`, `compile` and `loss_kernel` set to
auto) and the plan at the top of a run's train.log; `axiom info` prints it.

`resolve` is the one place those settings are chosen. It predicts the peak memory of a split from a model of
weights, gradients, optimizer state, activations and the loss's logits block (fitted to the H200 peaks of
docs/benchmarks.md, "Training on a GPU"), and takes:
  - the largest micro-batch that divides the step's sequences (per process) and fits: 320 = 2^6 x 5 sequences a step
    have the micro-batches 1, 2, 4, 5, 8, 10, 16, 20, 32, 40, 64, 80, 160 and 320, so the step stays exactly 320;
    a step with no divisor in between (a prime count) runs as micro-batches of 1, or as one if it fits whole;
  - activation checkpointing only where the micro-batch would otherwise fall below BUSY_TOKENS tokens on a GPU (one
    sequence on a CPU) and checkpointing makes room for a larger one;
  - torch.compile on CUDA, not on a CPU (where it does not pay);
  - the loss kernel AUTO_LOSS_KERNEL.
A micro-batch the prediction misjudged is halved by the trainer at its first out-of-memory (axiom/train/trainer.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from axiom.config import AUTO, Config, ModelConfig, TrainConfig
from axiom.model.loss import chunk_rows, default_vocab_multiple, padded_vocab
from axiom.model.transformer import block_params, flops_per_token, num_params
from axiom.runtime import GPU_BF16_PEAK_TFLOPS, gpu_peak_flops
from axiom.train.optim import runnable_optimizer
from axiom.train.progress import duration

GIB = 2**30
OPTIMIZER_STATE_BYTES = {"adamw8bit": 2, "adamw": 8}  # per parameter: two moments, 8-bit or fp32
# Values per token and d_model unit one block of the card's shape keeps for backward, eager and compiled (fitted to
# the H200 peaks of docs/benchmarks.md: inductor's fused kernels keep fewer); other shapes scale them by
# `block_saved_width`. Checkpointing keeps only each block's fp32 input.
BLOCK_ACTIVATION_VALUES = {False: 26, True: 18}


def block_saved_width(m: ModelConfig) -> int:
    """The values per token one block's eager forward saves for backward (counted with saved-tensor hooks,
    tests/test_plan.py): 9 x d_model (the norms' inputs and outputs, attention's output and its reshaped copy), 1.5 x
    the keys' and values' width (the projected heads, which SDPA's values are a view of, and the rotated queries and
    keys) and 4 x ffn_dim ([gate | up], silu(gate) and the product)."""
    return 9 * m.d_model + 3 * m.n_kv_heads * m.head_dim + 4 * m.ffn_dim


CARD_SAVED_PER_D_MODEL = block_saved_width(ModelConfig()) / ModelConfig().d_model  # 21.5
# The loss kernel auto runs: ours on every device, until `axiom bench loss` on a GPU measures one of the fused
# kernels (axiom/model/fused_loss.py) faster there (docs/benchmarks.md, "The loss kernels").
AUTO_LOSS_KERNEL = "chunked"
MEMORY_HEADROOM = 0.9  # the share of a device's memory a plan fills: allocator fragmentation, workspaces, context
# Tokens per micro-batch that keep an H100-class GPU busy (docs/benchmarks.md: the H200 micro-batch sweep).
BUSY_TOKENS = 8192
# The MFU a prediction assumes, compiled and eager (docs/benchmarks.md, "Training on a GPU": the preset as shipped,
# compiled at micro-batch 80, and eager at micro-batch 16, on an H200), and the share of it left with
# checkpointing (a forward recomputed).
ASSUMED_MFU = {True: 0.42, False: 0.23}
CHECKPOINTING_THROUGHPUT = 0.75
ASSUMED_GPU = "H100"  # what `axiom info --gpu-memory-gib` plans for: its bf16 peak


@dataclass(frozen=True)
class Hardware:
    """What a plan is made for."""

    kind: str  # cuda, cpu or mps
    memory_bytes: int  # the GPU's memory, or the host's
    peak_flops: float | None  # dense bf16 FLOP/s; None where unknown (a CPU)
    name: str


def local_hardware(device: torch.device) -> Hardware:
    """The device a run trains on: a GPU's total memory, else the host's RAM (the plan is the same every time)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return Hardware("cuda", props.total_memory, gpu_peak_flops(device), props.name)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(device.type, memory, None, "host memory")


def assumed_gpu(memory_gib: float) -> Hardware:
    """A GPU of `memory_gib` GiB with an H100's bf16 peak: a plan made without the GPU at hand."""
    peak = dict(GPU_BF16_PEAK_TFLOPS)[ASSUMED_GPU] * 1e12
    return Hardware("cuda", int(memory_gib * GIB), peak, f"{ASSUMED_GPU}-class, assumed")


@dataclass(frozen=True)
class Plan:
    """The concrete settings of a run on `hardware`, and what they are predicted to cost and give."""

    micro_batch_size: int
    grad_accum_steps: int  # summed over all processes, as in TrainConfig
    gradient_checkpointing: bool
    compile: bool
    loss_kernel: str
    chosen: tuple[str, ...]  # the settings that were auto
    memory: dict[str, int]  # predicted peak bytes by part, and "total"
    usable_bytes: int  # what the plan may fill
    mfu: float | None  # assumed for the prediction (None without a known peak)
    tokens_per_s: float | None  # predicted, all processes
    hardware: Hardware

    @property
    def fits(self) -> bool:
        """Whether the predicted peak fits the usable memory (not even one sequence at a time may)."""
        return self.memory["total"] <= self.usable_bytes

    def applied(self, cfg: Config) -> Config:
        """`cfg` with this plan's settings in place of auto: the config a run trains and stores."""
        t = dataclasses.replace(
            cfg.train,
            micro_batch_size=self.micro_batch_size,
            grad_accum_steps=self.grad_accum_steps,
            gradient_checkpointing=self.gradient_checkpointing,
            compile=self.compile,
            loss_kernel=self.loss_kernel,
        )
        return Config(cfg.model, t)

    def to_dict(self) -> dict:
        return {
            **{k: getattr(self, k) for k in ("micro_batch_size", "grad_accum_steps", "gradient_checkpointing")},
            "compile": self.compile,
            "loss_kernel": self.loss_kernel,
            "chosen": list(self.chosen),
            "memory_bytes": self.memory,
            "usable_bytes": self.usable_bytes,
            "fits": self.fits,
            "assumed_mfu": self.mfu,
            "predicted_tokens_per_s": self.tokens_per_s,
            "device": self.hardware.kind,
            "device_name": self.hardware.name,
            "device_memory_bytes": self.hardware.memory_bytes,
        }


def plan_here(
    cfg: Config, device: torch.device, world_size: int = 1, fsdp: bool = False
) -> tuple[Config, Plan, str | None]:
    """The plan of `cfg` on this machine's `device`, as `axiom train` runs it: `cfg` with the optimizer that will
    train (torch AdamW where AdamW8bit cannot run here), its plan for that optimizer's state, and the notice of such
    a fallback."""
    train, fallback = runnable_optimizer(cfg.train, device, fsdp)
    cfg = Config(cfg.model, train)
    return cfg, resolve(cfg, local_hardware(device), world_size), fallback


def resolve(cfg: Config, hardware: Hardware, world_size: int = 1) -> Plan:
    """The plan of `cfg` on `world_size` processes of `hardware`: the settings set to auto chosen (see the module's
    docstring), the others as given."""
    t = cfg.train
    compile_ = hardware.kind == "cuda" if t.compile == AUTO else t.compile
    micro, checkpointing = _split(cfg, hardware, world_size, compile_)
    accum = t.sequences_per_step // micro if t.micro_batch_size == AUTO else t.grad_accum_steps
    chosen = tuple(
        k for k in ("micro_batch_size", "gradient_checkpointing", "compile", "loss_kernel") if getattr(t, k) == AUTO
    )
    mfu = tokens_per_s = None
    if hardware.peak_flops:
        # Below BUSY_TOKENS a micro-batch leaves the GPU idle in proportion: the card's literal micro-batch of 1024
        # tokens, eager and checkpointed, predicts 2.2% MFU; the H200 measured 2.0-2.3%.
        busy = min(1.0, micro * t.seq_len / BUSY_TOKENS)
        mfu = ASSUMED_MFU[compile_] * (CHECKPOINTING_THROUGHPUT if checkpointing else 1.0) * busy
        tokens_per_s = mfu * hardware.peak_flops * world_size / flops_per_token(cfg.model, t.seq_len)
    return Plan(
        micro_batch_size=micro,
        grad_accum_steps=accum,
        gradient_checkpointing=checkpointing,
        compile=compile_,
        loss_kernel=AUTO_LOSS_KERNEL if t.loss_kernel == AUTO else t.loss_kernel,
        chosen=chosen,
        memory=training_memory_bytes(cfg, micro, checkpointing, hardware.kind, compile_, _shards(t, world_size)),
        usable_bytes=int(hardware.memory_bytes * MEMORY_HEADROOM),
        mfu=mfu,
        tokens_per_s=tokens_per_s,
        hardware=hardware,
    )


def _split(cfg: Config, hardware: Hardware, world_size: int, compiled: bool) -> tuple[int, bool]:
    """The micro-batch and activation checkpointing: as given, or chosen where auto."""
    t = cfg.train
    usable = hardware.memory_bytes * MEMORY_HEADROOM
    shards = _shards(t, world_size)

    def fits(micro: int, checkpointing: bool) -> bool:
        return training_memory_bytes(cfg, micro, checkpointing, hardware.kind, compiled, shards)["total"] <= usable

    if t.micro_batch_size != AUTO:
        given = t.gradient_checkpointing
        return t.micro_batch_size, not fits(t.micro_batch_size, False) if given == AUTO else given
    per_process = t.sequences_per_step // world_size
    sizes = [n for n in range(per_process, 0, -1) if per_process % n == 0]  # its divisors, the largest first

    def largest(checkpointing: bool) -> int | None:
        return next((n for n in sizes if fits(n, checkpointing)), None)

    if t.gradient_checkpointing != AUTO:
        return largest(t.gradient_checkpointing) or 1, t.gradient_checkpointing
    plain = largest(False)
    busy = max(BUSY_TOKENS // t.seq_len, 1) if hardware.kind == "cuda" else 1
    if plain is not None and plain >= min(busy, per_process):
        return plain, False
    recomputed = largest(True)
    if recomputed is not None and recomputed > (plain or 0):
        return recomputed, True
    return plain or 1, plain is None  # nothing larger fits either way: the one that fits, or 1 checkpointed


def _shards(t: TrainConfig, world_size: int) -> int:
    """How many ways FSDP splits the weights, gradients and optimizer state (1: every process holds them whole)."""
    return world_size if t.fsdp and world_size > 1 else 1


def smaller_micro_batch(micro_batch_size: int) -> int | None:
    """The micro-batch after an out-of-memory: the largest divisor of `micro_batch_size` up to half of it (so the
    micro-batches read still split evenly: 16 -> 8, 40 -> 20, 5 -> 1); None at 1."""
    return next((n for n in range(micro_batch_size // 2, 0, -1) if micro_batch_size % n == 0), None)


def accumulation_at(t: TrainConfig, micro_batch_size: int) -> int:
    """The accumulation that keeps `t`'s sequences per process and step at `micro_batch_size` (one of
    `smaller_micro_batch`'s: it divides them)."""
    return t.grad_accum_steps * t.micro_batch_size // micro_batch_size


def training_memory_bytes(
    cfg: Config, micro_batch_size: int, checkpointing: bool, device_type: str, compiled: bool = False, shards: int = 1
) -> dict[str, int]:
    """Predicted peak training memory per device, by part, as it stands in the forward of a step's second
    micro-batch (the gradients of the first are held): fp32 weights and grads, optimizer state, the bf16 copies of
    the matrices that the matmuls keep for backward (`low`, without checkpointing: with it, each block's copies go
    with the block), activations (BLOCK_ACTIVATION_VALUES per token and d_model in each block of the card's shape,
    eager or `compiled`, other shapes in proportion to `block_saved_width`; bf16 under autocast and fp32 otherwise;
    with checkpointing only each block's fp32 input and one block being recomputed; SDPA keeps no attention scores),
    and the chunked loss (`loss_memory_bytes`). A step of one micro-batch peaks lower: its gradients appear as the
    activations go. The fused loss kernels are predicted as ours (`axiom bench loss` measures their memory). Under
    FSDP (`shards` > 1) each process holds its share of the weights, gradients and optimizer state, and gathers whole
    the ones in use: the root's (the token table, an untied output table and the final norm) and one block's, with
    their gradients."""
    m, t = cfg.model, cfg.train
    low = device_type == "cuda" and t.dtype != "float32"  # autocast runs on CUDA only
    n = num_params(m)
    tokens = micro_batch_size * t.seq_len
    per_token = BLOCK_ACTIVATION_VALUES[compiled] * block_saved_width(m) / CARD_SAVED_PER_D_MODEL
    block = round(per_token * (2 if low else 4) * tokens)
    activations = m.n_layers * 4 * tokens * m.d_model + block if checkpointing else m.n_layers * block
    loss = loss_memory_bytes(m, min(tokens, chunk_rows(device_type)), default_vocab_multiple(device_type), low)
    # the root's parameters (the table, an untied output table, the final norm) and one block
    gathered = n - (m.n_layers - 1) * block_params(m) if shards > 1 else 0
    parts = {
        "weights": 4 * n // shards,
        "grads": 4 * n // shards,
        "optimizer": OPTIMIZER_STATE_BYTES[t.optimizer] * n // shards,
        "gathered": 8 * gathered,
        # the blocks' matrices: the output table's low-precision copy is the loss's own, tied or not (loss.py)
        "casts": 2 * m.n_layers * block_params(m) if low and not checkpointing else 0,
        "activations": activations,
        "loss": loss,
    }
    parts["total"] = sum(parts.values())
    return parts


def loss_memory_bytes(m: ModelConfig, rows: int, vocab_multiple: int, low: bool) -> int:
    """What the chunked loss (axiom/model/loss.py) holds at its peak, for chunks of `rows`: the table it multiplies
    by, cast to low precision or padded (one copy per call), and the fp32 gradient of the padded table; then a
    chunk's fp32 logits block over the padded vocabulary and, `low` (under autocast), the low-precision gradient
    written from it, or later that gradient with the low-precision product added into the table's gradient."""
    columns = padded_vocab(m.vocab_size, vocab_multiple)
    table_copy = 2 * columns * m.d_model if low else 4 * columns * m.d_model * (columns != m.vocab_size)
    chunk = max(rows * columns * 6, rows * columns * 2 + 2 * columns * m.d_model) if low else rows * columns * 4
    return table_copy + 4 * columns * m.d_model + chunk


def describe(cfg: Config, plan: Plan) -> dict:
    """`axiom info --json`: the sizes and cost of `cfg`, and its plan."""
    m, t = cfg.model, cfg.train
    return {
        "params": num_params(m),
        "non_embedding_params": num_params(m, non_embedding=True),
        "head_dim": m.head_dim,
        "ffn_dim": m.ffn_dim,
        "tokens_per_step": t.tokens_per_step,
        "steps": t.steps,
        "planned_tokens": t.planned_tokens,
        "flops_per_token": flops_per_token(m, t.seq_len),
        "train_flops": flops_per_token(m, t.seq_len) * t.planned_tokens,
        "train_memory_bytes": plan.memory["total"],
        "plan": plan.to_dict(),
    }


def plan_summary(cfg: Config, plan: Plan) -> list[str]:
    """The plan in words, for train.log and `axiom info`: the split, checkpointing, compile and the loss kernel
    (marked auto where the plan chose them), the predicted memory, and the predicted speed and time of the run."""

    def chosen(name: str, value: str) -> str:
        return f"{value} (auto)" if name in plan.chosen else value

    on_off = {True: "on", False: "off"}
    hw, mem = plan.hardware, plan.memory
    split = f"{plan.micro_batch_size} x {plan.grad_accum_steps} accumulation"
    lines = [
        f"micro-batch {chosen('micro_batch_size', split)}, activation checkpointing "
        f"{chosen('gradient_checkpointing', on_off[plan.gradient_checkpointing])}, compile "
        f"{chosen('compile', on_off[plan.compile])}, loss {chosen('loss_kernel', plan.loss_kernel)}",
        f"memory {mem['total'] / GIB:.1f} GiB predicted of {plan.usable_bytes / GIB:.1f} usable on {hw.kind} "
        f"({hw.memory_bytes / GIB:.0f} GiB, {hw.name}): "
        + ", ".join(f"{k} {v / GIB:.2f}" for k, v in mem.items() if k != "total" and v)
        + ("" if plan.fits else "; more than fits: expect the run to run out of memory"),
    ]
    if plan.tokens_per_s:
        run = duration(cfg.train.planned_tokens / plan.tokens_per_s)
        lines.append(
            f"speed {plan.tokens_per_s:,.0f} tokens/s predicted at {plan.mfu:.1%} MFU (assumed): the run's "
            f"{cfg.train.planned_tokens:,} tokens in about {run}"
        )
    return lines


def plan_lines(cfg: Config, plan: Plan, device: torch.device, world_size: int, optimizer_name: str) -> list[str]:
    """The model, batch, plan, schedule, optimizer and device of a run (`cfg` as planned), train.log's first lines."""
    m, t = cfg.model, cfg.train
    decay = round(t.decay_fraction * t.steps)
    precision = f"{t.dtype} autocast" if device.type == "cuda" and t.dtype != "float32" else "float32"
    return [
        f"model        {num_params(m):,} parameters ({num_params(m, non_embedding=True):,} non-embedding): "
        f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads / {m.n_kv_heads} KV heads",
        f"batch        {t.micro_batch_size} x {t.seq_len} tokens x {t.grad_accum_steps} micro-batches "
        f"({world_size} process{'es' if world_size > 1 else ''}) = {t.tokens_per_step:,} tokens per step",
        *(f"plan         {line}" for line in plan_summary(cfg, plan)),
        f"schedule     {t.steps:,} steps = {t.planned_tokens:,} tokens; warmup {t.warmup_steps:,}, "
        f"lr {t.lr_max:g} constant, cosine to {t.lr_min:g} over the last {decay:,} steps",
        f"optimizer    {optimizer_name}, betas ({t.beta1}, {t.beta2}), weight decay {t.weight_decay} on matrices",
        f"device       {device} x {world_size}, {precision}",
    ]
