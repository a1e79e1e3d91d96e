"""The training plan (axiom/train/plan.py): the settings left to auto resolved from a device and its memory, without
the device: micro-batch and accumulation (tokens per step exact), activation checkpointing, compile, the predicted
memory and speed, and `axiom info --gpu-memory-gib` printing them."""

from __future__ import annotations

import dataclasses
import json
import sys
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from axiom.cli import main
from axiom.config import get_config
from axiom.errors import AxiomError
from axiom.model.loss import chunked_cross_entropy
from axiom.model.transformer import Axiom, Block, num_params, rope_tables
from axiom.train.parallel import Dist, parallelize
from axiom.train.plan import (
    BUSY_TOKENS,
    GIB,
    Hardware,
    assumed_gpu,
    local_hardware,
    loss_memory_bytes,
    resolve,
    smaller_micro_batch,
    training_memory_bytes,
)

CARD_LITERAL = ["micro_batch_size=1", "gradient_checkpointing=true", "compile=false"]


@pytest.mark.parametrize("gib", [8, 16, 24, 40, 80, 141, 1000])
def test_the_card_plan_keeps_its_step_and_fits(gib):
    """For any GPU: a micro-batch dividing the card's 320 sequences, accumulation making up exactly 327,680 tokens,
    the prediction within the memory the plan may fill, compile on."""
    cfg = get_config("axiom-380m")
    plan = resolve(cfg, assumed_gpu(gib))
    planned = plan.applied(cfg).train
    assert 320 % plan.micro_batch_size == 0 and plan.micro_batch_size * plan.grad_accum_steps == 320
    assert planned.tokens_per_step == cfg.train.tokens_per_step == 327_680 and planned.steps == cfg.train.steps
    assert plan.memory["total"] <= plan.usable_bytes and plan.compile is True
    assert plan.chosen == ("micro_batch_size", "gradient_checkpointing", "compile", "loss_kernel")
    busy = plan.micro_batch_size * planned.seq_len >= BUSY_TOKENS
    assert busy or plan.gradient_checkpointing  # a small micro-batch only where even checkpointing fits no larger
    if plan.micro_batch_size < 320:  # the next larger divisor of 320 would not fit, checkpointed or not
        larger = next(n for n in range(plan.micro_batch_size + 1, 321) if 320 % n == 0)
        low = training_memory_bytes(cfg, larger, plan.gradient_checkpointing, "cuda", plan.compile)["total"]
        assert low > plan.usable_bytes


def test_checkpointing_only_until_the_memory_allows_a_busy_micro_batch_without():
    """More memory: checkpointing goes off once a micro-batch of BUSY_TOKENS fits without it, and stays off; with
    checkpointing on or off alike, the micro-batch never shrinks."""
    cfg = get_config("axiom-380m")
    plans = [resolve(cfg, assumed_gpu(gib)) for gib in (4, 6, 8, 12, 16, 20, 24, 40, 80, 141)]
    recomputed = [p.gradient_checkpointing for p in plans]
    assert recomputed == sorted(recomputed, reverse=True) and recomputed[0] and not recomputed[-1]
    for a, b in zip(plans, plans[1:], strict=False):
        assert a.micro_batch_size <= b.micro_batch_size or (a.gradient_checkpointing and not b.gradient_checkpointing)
    first_plain = next(p for p in plans if not p.gradient_checkpointing)
    assert first_plain.micro_batch_size * 1024 >= BUSY_TOKENS
    big = plans[-2]  # 80 GiB: large micro-batches without recomputing the forward
    assert (big.micro_batch_size, big.grad_accum_steps, big.gradient_checkpointing) == (64, 5, False)
    assert big.tokens_per_s == pytest.approx(0.42 * 989e12 / 2_616_784_896)  # the assumed MFU, compiled


def test_given_settings_are_kept_and_the_card_literal_is_one_line_away():
    cfg = get_config("axiom-380m", CARD_LITERAL)
    plan = resolve(cfg, assumed_gpu(80))
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.gradient_checkpointing, plan.compile) == (
        1,
        320,
        True,
        False,
    )
    assert plan.chosen == ("loss_kernel",) and plan.loss_kernel == "chunked"  # not among the card's settings
    assert plan.applied(cfg) == get_config("axiom-380m", [*CARD_LITERAL, "loss_kernel=chunked"])
    assert plan.mfu == pytest.approx(0.23 * 0.75 / 8)  # eager, checkpointed, an eighth of a busy micro-batch
    # a given micro-batch with checkpointing left to auto: on only where the micro-batch does not fit without it
    fixed = get_config("axiom-380m", ["micro_batch_size=32"])
    assert resolve(fixed, assumed_gpu(80)).gradient_checkpointing is False
    assert resolve(fixed, assumed_gpu(24)).gradient_checkpointing is True


def test_steps_that_do_not_divide_evenly_still_keep_their_tokens():
    """The micro-batch is always a divisor of the step's sequences (per process): a prime count runs as micro-batches
    of one (or, checkpointed, as a single one), an odd count as its largest divisor that fits; under two processes
    each takes half."""
    prime = resolve(get_config("axiom-380m", ["grad_accum_steps=317", "gradient_checkpointing=false"]), assumed_gpu(80))
    assert (prime.micro_batch_size, prime.grad_accum_steps) == (1, 317)
    whole = resolve(get_config("axiom-380m", ["grad_accum_steps=317"]), assumed_gpu(80))  # checkpointing makes room
    assert (whole.micro_batch_size, whole.grad_accum_steps, whole.gradient_checkpointing) == (317, 1, True)
    odd = resolve(get_config("axiom-380m", ["grad_accum_steps=45"]), assumed_gpu(40))
    assert (odd.micro_batch_size, odd.grad_accum_steps) == (15, 3)
    two = resolve(get_config("axiom-380m"), assumed_gpu(80), world_size=2)
    assert 160 % two.micro_batch_size == 0 and two.micro_batch_size * two.grad_accum_steps == 320
    assert two.grad_accum_steps % 2 == 0


def test_compile_is_on_for_cuda_only_and_a_cpu_plans_with_its_memory():
    cpu = Hardware("cpu", 16 * GIB, None, "host memory")
    plan = resolve(get_config("axiom-380m"), cpu)
    assert plan.compile is False and plan.tokens_per_s is None and plan.mfu is None
    assert 320 % plan.micro_batch_size == 0 and plan.memory["casts"] == 0  # fp32 on a CPU: no autocast copies
    tiny = get_config("tiny")  # the demo's preset sets everything: its plan is itself, on this machine's CPU
    here = resolve(tiny, local_hardware(torch.device("cpu")))
    assert here.applied(tiny) == tiny and here.chosen == ()
    assert resolve(get_config("tiny", ["compile=auto"]), assumed_gpu(24)).compile is True


def test_back_off_sizes_divide_the_micro_batch_read():
    assert [smaller_micro_batch(n) for n in (64, 40, 16, 6, 5, 2, 1)] == [32, 20, 8, 3, 1, 1, None]


def test_parallelize_refuses_an_unplanned_config():
    with pytest.raises(ValueError, match="plan the config first"):  # "auto" would read as true: compiled on a CPU
        parallelize(torch.nn.Linear(1, 1), get_config("axiom-380m").train, torch.device("cpu"), Dist())


def test_auto_is_set_from_the_command_line_and_from_files(tmp_path):
    cfg = get_config("tiny", ["micro_batch_size=auto", "gradient_checkpointing=AUTO", "compile=auto"])
    assert (cfg.train.micro_batch_size, cfg.train.gradient_checkpointing, cfg.train.compile) == ("auto",) * 3
    assert cfg.train.tokens_per_step == cfg.train.grad_accum_steps * cfg.train.seq_len  # auto counts 1 sequence
    path = tmp_path / "auto.toml"
    path.write_text('preset = "tiny"\n[train]\nmicro_batch_size = "auto"\ncompile = "auto"\n')
    assert main(["info", "--config", str(path), "--gpu-memory-gib", "24", "--json"]) == 0


def test_info_prints_the_plan_for_a_gpu_that_is_not_here(capsys):
    args = ["info", "--preset", "axiom-380m", "--device", "cuda", "--gpu-memory-gib", "80"]
    assert main([*args, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    plan = info["plan"]
    assert (plan["micro_batch_size"], plan["grad_accum_steps"]) == (64, 5) and info["tokens_per_step"] == 327_680
    assert plan["gradient_checkpointing"] is False and plan["compile"] is True and plan["device"] == "cuda"
    assert info["train_memory_bytes"] == plan["memory_bytes"]["total"] <= plan["usable_bytes"]
    assert plan["predicted_tokens_per_s"] > 0 and plan["assumed_mfu"] == 0.42
    assert main(args) == 0
    text = capsys.readouterr().out
    assert (
        "plan: micro-batch 64 x 5 accumulation (auto), activation checkpointing off (auto), compile on (auto)" in text
    )
    assert "GiB predicted of 72.0 usable on cuda (80 GiB, H100-class, assumed)" in text
    assert "tokens/s predicted at 42.0% MFU (assumed): the run's 7,999,979,520 tokens in about" in text
    assert main(["info", "--preset", "axiom-380m", "--gpu-memory-gib", "80", "--json"]) == 0  # implies cuda
    assert json.loads(capsys.readouterr().out)["plan"] == plan


def test_info_refuses_a_plan_it_cannot_make(capsys):
    assert main(["info", "--preset", "tiny", "--device", "cpu", "--gpu-memory-gib", "80"]) == 2
    assert "--gpu-memory-gib plans for a GPU: it goes with --device cuda" in capsys.readouterr().err
    assert main(["info", "--preset", "tiny", "--gpu-memory-gib", "0"]) == 2
    assert "must be a number of GiB above 0, below 1e6" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["info", "--preset", "tiny", "--device", "cuda"]) == 2
        assert "no CUDA device is visible; add --gpu-memory-gib GIB to plan for one" in capsys.readouterr().err


def test_info_plans_the_optimizer_that_would_train_here(capsys, monkeypatch):
    """Without bitsandbytes `axiom train` plans torch AdamW's state (8 bytes a parameter, not 2): `axiom info` for
    this machine says the same, with the notice; for an assumed GPU it plans the card's AdamW8bit."""
    eight_bit = ["--preset", "tiny", "--set", "optimizer=adamw8bit", "--json"]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    assert main(["info", *eight_bit, "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    n = json.loads(out)["params"]
    assert json.loads(out)["plan"]["memory_bytes"]["optimizer"] == 8 * n
    assert "notice: bitsandbytes is not usable (ModuleNotFoundError" in err and "using torch AdamW" in err
    assert main(["info", *eight_bit, "--gpu-memory-gib", "80"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["plan"]["memory_bytes"]["optimizer"] == 2 * n and err == ""


def test_a_cpu_plan_of_the_card_is_the_same_every_time(capsys):
    """Planned from the host's total memory (not what is free now): `axiom info` prints the same plan twice."""
    outputs = []
    for _ in range(2):
        assert main(["info", "--preset", "axiom-380m", "--device", "cpu", "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and outputs[0]["plan"]["compile"] is False
    with pytest.raises(AxiomError):
        get_config("axiom-380m", ["micro_batch_size=0"])


def test_an_untied_output_table_adds_its_weights_grads_and_optimizer_state_only():
    """The loss casts the output table itself, tied or not: the blocks' casts were predicted with an untied table
    among them (0.2 GiB more for axiom-380m)."""
    memory = {}
    for tied in (True, False):
        cfg = get_config("axiom-380m", [f"tie_embeddings={tied}"])
        memory[tied] = training_memory_bytes(cfg, 4, checkpointing=False, device_type="cuda")
    table = cfg.model.vocab_size * cfg.model.d_model
    more = {part: memory[False][part] - memory[True][part] for part in memory[True]}
    state = 2 * table  # AdamW8bit's bytes a parameter
    want = {"weights": 4 * table, "grads": 4 * table, "optimizer": state, "total": 10 * table}
    assert more == {**dict.fromkeys(memory[True], 0), **want}
    assert memory[True]["casts"] > 0


def saved_values_per_token(m) -> float:
    """The values one eager block of shape `m` keeps for backward per token (each storage once, weights left out)."""
    T = 64
    block = Block(m)
    x = torch.randn(1, T, m.d_model, requires_grad=True)
    cos, sin = rope_tables(m.head_dim, T, m.rope_theta)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        block(x, cos, sin)
    return sum(n for ptr, n in storages.items() if ptr not in weights) / T


@pytest.mark.parametrize(
    "shape",
    [
        ["ffn_multiplier=8"],
        ["ffn_multiplier=1"],
        ["n_kv_heads=16"],
        ["n_kv_heads=1"],
        ["d_model=256", "n_heads=4", "n_kv_heads=2"],
    ],
    ids=["wide-ffn", "narrow-ffn", "mha", "mqa", "d256"],
)
def test_predicted_activations_follow_the_widths_a_block_saves(shape):
    """Activations were predicted from d_model alone, fitted at the card's shape: a 4x wider FFN keeps twice the
    values, which the plan did not see (nor MHA's larger keys and values)."""
    torch.manual_seed(0)
    card, other = get_config("axiom-380m", CARD_LITERAL), get_config("axiom-380m", [*CARD_LITERAL, *shape])

    def predicted(cfg) -> float:
        return training_memory_bytes(cfg, 1, checkpointing=False, device_type="cpu")["activations"] / cfg.model.n_layers

    measured = saved_values_per_token(other.model) / saved_values_per_token(card.model)
    assert predicted(other) / predicted(card) == pytest.approx(measured, rel=0.03)


def test_fsdp_plans_each_process_its_share():
    """Under FSDP every rank holds 1/world_size of the weights, gradients and optimizer state, and gathers the table
    and one block whole: the plan predicted them whole on every rank (6.8 GiB on 8 GPUs of 6 GiB: 'more than fits')."""
    cfg = get_config("axiom-380m")
    n = num_params(cfg.model)
    whole = resolve(cfg, assumed_gpu(6), world_size=8)
    sharded = resolve(get_config("axiom-380m", ["fsdp=true"]), assumed_gpu(6), world_size=8)
    assert whole.memory["weights"] == 4 * n and whole.memory["gathered"] == 0
    assert sharded.memory["weights"] == sharded.memory["grads"] == 4 * n // 8
    assert sharded.memory["optimizer"] == 2 * n // 8  # AdamW8bit's bytes a parameter, as planned (launch falls back)
    with torch.device("meta"):  # what FSDP gathers, counted on the modules: one block, the root's own parameters
        block = sum(p.numel() for p in Block(cfg.model).parameters())
        for tied in (True, False):  # an untied output table is the root's too (one block's share was predicted)
            m = dataclasses.replace(cfg.model, tie_embeddings=tied)
            root = Axiom(m)
            root_params = sum(p.numel() for p in root.parameters()) - m.n_layers * block
            plan = resolve(get_config("axiom-380m", ["fsdp=true", f"tie_embeddings={tied}"]), assumed_gpu(6), 8)
            assert plan.memory["gathered"] == 8 * (root_params + block), tied
    assert sharded.micro_batch_size >= whole.micro_batch_size and sharded.fits
    one = resolve(get_config("axiom-380m", ["fsdp=true"]), assumed_gpu(6))
    assert one.memory == resolve(cfg, assumed_gpu(6)).memory  # one process: nothing to shard


class LiveBytes(TorchDispatchMode):
    """The peak bytes of the storages the operations inside make, each counted while any tensor on it lives."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.holders: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.sizes:
                    self.sizes[ptr] = t.untyped_storage().nbytes()
                    self.now += self.sizes[ptr]
                    self.peak = max(self.peak, self.now)
                self.holders[ptr] = self.holders.get(ptr, 0) + 1
                weakref.finalize(t, self._released, ptr)
        return out

    def _released(self, ptr: int) -> None:
        self.holders[ptr] -= 1
        if not self.holders[ptr]:
            self.now -= self.sizes.pop(ptr)


@pytest.mark.parametrize("low", [True, False], ids=["bf16-autocast", "fp32"])
def test_the_predicted_loss_memory_is_what_the_loss_holds(low):
    """The plan's loss term against the peak of the tensors the chunked loss makes, on a padded vocabulary (as on a
    GPU): it left out the table's bf16 (or padded) copy, live beside the table's fp32 gradient while the loss runs
    (0.19 GiB at the card's size), and, at shapes like these (few rows, where the card's chunk of 4,096 rows peaks
    at its logits), the table-sized product added into that gradient. What remains is (N, d)-sized: the hidden
    states' gradient, a chunk's products."""
    m = dataclasses.replace(get_config("tiny").model, vocab_size=4000, d_model=64)
    rows, tokens = 32, 96
    weight = torch.randn(m.vocab_size, m.d_model, requires_grad=True)
    hidden = torch.randn(tokens, m.d_model, requires_grad=True)
    targets = torch.randint(0, m.vocab_size, (tokens,))
    with torch.autocast("cpu", torch.bfloat16, enabled=low), LiveBytes() as held:
        chunked_cross_entropy(hidden, weight, targets, chunk=rows, vocab_multiple=128)
    predicted = loss_memory_bytes(m, rows, 128, low)
    assert predicted <= held.peak <= predicted + 4 * tokens * m.d_model * 4
