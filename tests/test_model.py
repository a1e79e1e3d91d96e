import contextlib
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import count_params, save_model
from torch.utils._python_dispatch import TorchDispatchMode

from axiom.config import ModelConfig, get_config
from axiom.infer.generate import generate
from axiom.model.checkpoint import load_model
from axiom.model.loss import chunked_cross_entropy
from axiom.model.transformer import Axiom, flops_per_token, num_params
from axiom.runtime import autocast

SMALL = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_multiple_of=16, max_seq_len=64)


@pytest.fixture
def model(device):
    torch.manual_seed(0)
    return Axiom(SMALL).to(device).eval()


@pytest.fixture
def cpu_model():
    torch.manual_seed(0)
    return Axiom(SMALL).eval()


def test_card_parameter_count_on_meta_device():
    cfg = get_config("axiom-380m").model
    with torch.device("meta"):
        m = Axiom(cfg)
    assert count_params(m) == num_params(cfg) == 385_849_344
    assert count_params(m, non_embedding=True) == 385_849_344 - 100_277 * 1024
    assert m.lm_head.weight is m.embed.weight
    assert flops_per_token(cfg, 1024) == 6 * (385_849_344 - 49 * 1024) + 12 * 24 * 1024 * 1024


def test_causality(model, device):
    x = torch.randint(0, 97, (2, 20), device=device)
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def naive_attention(attn, x, cos, sin):
    """Reference: per-head softmax(QK^T/sqrt(d) + causal mask) V with KV heads repeated explicitly."""
    from axiom.model.transformer import apply_rope

    B, T, _ = x.shape
    nh, nkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = attn.qkv_proj(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q = apply_rope(q.view(B, T, nh, hd).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(B, T, nkv, hd).transpose(1, 2), cos, sin).repeat_interleave(nh // nkv, dim=1)
    v = v.view(B, T, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def test_gqa_attention_equals_naive_reference(model, device):
    attn = model.layers[0].attn
    x = torch.randn(2, 10, SMALL.d_model, device=device)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    with torch.no_grad():
        assert torch.allclose(attn(x, cos, sin), naive_attention(attn, x, cos, sin), atol=1e-5)


class DispatchedOps(TorchDispatchMode):
    """The names of the aten ops run under it, in order (views included): what a GPU would launch as kernels."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def test_attention_backward_writes_the_heads_gradients_without_cats_or_zero_padded_copies(model, device):
    """The gradients equal the naive reference's, and backward writes the query, key and value gradients into one
    tensor shaped like the projection's output: slicing them out of it made a zero-filled copy per slice, and joining
    them took a cat for RoPE's halves, one for queries with keys and one for those with values, a pass over the
    heads each (docs/benchmarks.md, "The second GPU check")."""
    attn = model.layers[0].attn
    x = torch.randn(2, 10, SMALL.d_model, device=device, requires_grad=True)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    weight = torch.randn(2, 10, SMALL.d_model, device=device)
    expected = torch.autograd.grad((naive_attention(attn, x, cos, sin) * weight).sum(), (x, attn.qkv_proj.weight))
    out = attn(x, cos, sin)
    ops = DispatchedOps()
    with ops:
        got = torch.autograd.grad((out * weight).sum(), (x, attn.qkv_proj.weight))
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert "slice_backward" not in ops.names and "cat" not in ops.names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_trainings_rope_equals_apply_rope_and_autograds_gradient_bit_for_bit(device, dtype):
    """The rotated queries and keys and the values of eager training (`_RotaryQKV`) are `apply_rope`'s over the split
    heads bit for bit, and so is the gradient of the heads, float32 tables with bfloat16 heads included (autocast)."""
    from axiom.model.transformer import _RotaryQKV, apply_rope

    torch.manual_seed(0)
    B, T, nh, nkv, hd = 2, 10, 4, 2, 16
    cos, sin = torch.randn(2, T, hd, device=device)  # any tables, not only RoPE's (whose two halves are equal)
    heads = torch.randn(B, T, nh + 2 * nkv, hd, device=device, dtype=dtype, requires_grad=True)
    weights = [torch.randn(B, n, T, hd, device=device, dtype=dtype) for n in (nh, nkv, nkv)]

    qk, v = heads.split([nh + nkv, nkv], dim=2)
    plain = (*apply_rope(qk.transpose(1, 2), cos, sin).split([nh, nkv], dim=1), v.transpose(1, 2))
    ours = tuple(t.transpose(1, 2) for t in _RotaryQKV.apply(heads, cos, sin, nh, nkv))
    assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(ours, plain, strict=True))
    (expected,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(plain, weights, strict=True)), heads)
    (got,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ours, weights, strict=True)), heads)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_backward_equals_autograds_and_writes_one_gradient_without_a_cat(device, dtype):
    """Eager training's SwiGLU gives the plain ops' output and gradients bit for bit, and its backward writes both
    halves' gradients into one tensor: three elementwise kernels where autograd took four, one of them a cat."""
    from axiom.model.transformer import SwiGLU

    torch.manual_seed(0)
    mlp = SwiGLU(SMALL).to(device, dtype)
    x = torch.randn(2, 10, SMALL.d_model, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(2, 10, SMALL.d_model, device=device, dtype=dtype)
    gate, up = mlp.gate_up_proj(x).split(mlp.ffn_dim, dim=-1)
    plain = mlp.down_proj(F.silu(gate) * up)
    expected = torch.autograd.grad((plain * weight).sum(), (x, mlp.gate_up_proj.weight))
    out = mlp(x)
    ops = DispatchedOps()
    with ops:
        got = torch.autograd.grad((out * weight).sum(), (x, mlp.gate_up_proj.weight))
    assert torch.equal(out, plain) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert "cat" not in ops.names and ops.names.count("mul") == 4  # the weighted sum's two, one per half
    with torch.no_grad():  # decoding: the plain ops, no autograd function
        assert torch.equal(mlp(x), plain)


def test_kv_cache_greedy_equals_full_recompute(model, device):
    prompt = [5, 17, 3, 88, 42]
    cached = generate(model, [prompt], 12, temperature=0)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq], device=device))[0, -1].argmax()))
    assert cached == seq[len(prompt) :]


def test_compiled_static_cache_update_writes_only_the_new_slots():
    """Compiled, a static cache's per-row update is an in-place write of the new slots: inductor's code has no loop
    over the whole cache (a scatter_ there compiled into a copy of every layer's cache at every decoding step)."""
    from torch._inductor.utils import run_and_get_code

    from axiom.model.cache import KVCache

    cfg = get_config("tiny", ["n_layers=1", "d_model=16", "n_heads=2", "n_kv_heads=2"]).model
    cache = KVCache.empty(cfg, 3, 512, "cpu", torch.float32, static=True)
    k, v = torch.randn(2, 3, 2, 2, cfg.head_dim).unbind(0)  # (B, n_kv, T, hd), two new slots per row
    slots = torch.tensor([[5, 6], [9, 10], [100, 101]])

    def update(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        cache.write_at(slots)
        cache.update(0, k, v)
        return k.sum()

    _, code = run_and_get_code(torch.compile(update), k, v, slots)
    assert str(cache.keys[0].numel()) not in "\n".join(code)
    for row, written in enumerate(slots.tolist()):
        assert torch.equal(cache.keys[0][row, :, written], k[row]) and torch.equal(
            cache.values[0][row, :, written], v[row]
        )
    assert cache.keys[0].count_nonzero() == k.numel()  # nothing else written


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # its eager reference, meant here
@pytest.mark.parametrize("max_len", [1024, 200])
def test_a_decoding_steps_block_mask_lists_each_rows_blocks_up_to_its_own_slot(max_len):
    """A compiled step's mask lists per row only the blocks of 128 slots up to the one it writes (what its attention
    reads), and allows exactly slots 0..filled: flex_attention under it equals SDPA under the dense mask, compiled
    (the kernel skips unlisted blocks) and eager (which reads the slot rule alone)."""
    from torch.nn.attention.flex_attention import flex_attention

    from axiom.model.transformer import filled_slots_mask

    filled = torch.tensor([0, 127, 128, 129, 150, max_len - 1])
    mask = filled_slots_mask(filled, max_len)
    blocks = [1, 1, 2, 2, 2, 8] if max_len == 1024 else [1, 1, 2, 2, 2, 2]
    assert mask.kv_num_blocks.flatten().tolist() == blocks
    torch.manual_seed(0)
    q = torch.randn(len(filled), 4, 1, 16)
    k, v = torch.randn(2, len(filled), 2, max_len, 16).unbind(0)
    k[:, :, 1:] += 5.0 * (torch.arange(max_len - 1) % 3 == 0)[:, None]  # slots beyond a row's own weigh heavily
    dense = torch.arange(max_len)[None, None, None] <= filled[:, None, None, None]  # (B, 1, 1, S)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)

    def attend(q, k, v, filled):
        return flex_attention(q, k, v, block_mask=filled_slots_mask(filled, max_len), enable_gqa=True)

    assert torch.allclose(attend(q, k, v, filled), expected, atol=1e-6)
    try:
        compiled = torch.compile(attend, fullgraph=True)(q, k, v, filled)
    except Exception as e:  # inductor's CPU template for flex_attention does not build everywhere (see FLEX_DEVICES)
        pytest.skip(f"inductor cannot build flex_attention's CPU kernel here: {str(e).splitlines()[0][:100]}")
    assert torch.allclose(compiled, expected, atol=1e-6)


def test_flex_decoding_takes_the_gpu_and_the_head_shapes_its_kernels_take():
    from axiom.model.transformer import flex_decoding

    card = get_config("axiom-380m").model
    assert flex_decoding(card, "cuda") and flex_decoding(card, torch.device("cuda:1"))
    assert not flex_decoding(card, "cpu")
    assert not flex_decoding(SMALL, "cuda")  # head_dim 8: Triton's dot products need 16
    assert not flex_decoding(ModelConfig(d_model=192, n_heads=12, n_kv_heads=4), "cuda")  # 3 query heads per key


# head_dim 16, the least flex_attention's kernels take on a GPU
FLEX = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_multiple_of=16, max_seq_len=64)


def test_a_compiled_static_step_attends_through_the_block_mask_as_the_eager_step_does(device, monkeypatch):
    """A static cache's compiled one-token steps attend through flex_attention under the block mask, rows at different
    fill levels, and give the eager static step's hidden states and tokens (SDPA under the dense mask) step after
    step. On a GPU inductor compiles it; on a CPU the step is traced as on a GPU (FLEX_DEVICES) and run eagerly."""
    from torch._dynamo.backends.debugging import aot_eager
    from torch._inductor.compile_fx import compile_fx

    from axiom.infer.compiled import decode_greedy
    from axiom.infer.engine import prefill_rows
    from axiom.model import transformer
    from axiom.model.cache import KVCache

    torch.manual_seed(0)
    model = Axiom(FLEX).to(device).eval()
    if device.type == "cpu":
        monkeypatch.setattr(transformer, "FLEX_DEVICES", frozenset({"cpu"}))
    graphs = []

    def backend(gm: torch.fx.GraphModule, inputs):
        graphs.append(gm)
        return (compile_fx if device.type == "cuda" else aot_eager)(gm, inputs)

    compiled = torch.compile(decode_greedy, backend=backend, fullgraph=True, dynamic=False)
    prompts = [[5, 6, 7, 8, 9], [3], [12, 13, 14]]
    caches = [KVCache.empty(FLEX, len(prompts), FLEX.max_seq_len, device, torch.float32, static=True) for _ in "ab"]
    with torch.no_grad():
        for cache in caches:  # each prompt prefilled alone into its row: rows at different fill levels
            for row, prompt in enumerate(prompts):
                prefill_rows(model, cache, row, [prompt])
        ids = [torch.tensor([p[-1] for p in prompts], device=device) for _ in caches]  # each step overwrites its own
        for _ in range(6):
            picked, hidden = compiled(model, ids[0], caches[0])
            expected, expected_hidden = decode_greedy(model, ids[1], caches[1])
            assert torch.equal(picked, expected) and torch.allclose(hidden, expected_hidden, atol=1e-5)
            assert torch.equal(ids[0], picked) and torch.equal(ids[1], picked)  # the next step's inputs
    assert caches[0].positions.tolist() == [11, 7, 9]
    assert any("flex_attention" in str(node.target) for gm in graphs for node in gm.graph.nodes)


def test_batched_prompts_of_different_lengths_match_single(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [40, 41, 42, 43]]
    batched = generate(model, prompts, 6, temperature=0)
    assert batched == [generate(model, [p], 6, temperature=0)[0] for p in prompts]


def test_sampling_is_seeded_and_stops_at_eos(model):
    a = generate(model, [[1, 2]], 10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = generate(model, [[1, 2]], 10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    assert a == b and len(a[0]) == 10
    first = generate(model, [[1, 2]], 10, temperature=0)[0][0]
    assert generate(model, [[1, 2]], 10, temperature=0, eos_id=first) == [[first]]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_cross_entropy(chunk, device):
    torch.manual_seed(0)
    h = torch.randn(50, 16, device=device, requires_grad=True)
    w = torch.randn(97, 16, device=device, requires_grad=True)
    t = torch.randint(0, 97, (50,), device=device)
    t[3] = -100  # ignored position
    loss = chunked_cross_entropy(h, w, t, chunk)
    (loss * 2.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t)
    (ref * 2.5).backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)


def grads(model, x, y):
    model.zero_grad()
    model(x, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_same_gradients(model, device):
    model.train()
    x, y = torch.randint(0, 97, (2, 16), device=device), torch.randint(0, 97, (2, 16), device=device)
    plain = grads(model, x, y)
    model.gradient_checkpointing = True
    checkpointed = grads(model, x, y)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_mixed_precision_keeps_no_cache_of_weight_copies():
    """Training's autocast casts each weight where it is used and keeps no cache of the copies, which would hold
    every layer's bf16 weights to the end of a checkpointed forward; on a CPU it is off (fp32)."""
    with autocast(torch.device("cuda"), "bfloat16"):  # made, not run: the setting is the same without a GPU
        assert torch.is_autocast_cache_enabled() is False
    assert isinstance(autocast(torch.device("cpu"), "bfloat16"), contextlib.nullcontext)


def test_tied_weights_stay_tied_through_training_and_reload(cpu_model, tmp_path):
    model = cpu_model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))).backward()
    opt.step()
    assert model.lm_head.weight is model.embed.weight
    cfg = get_config("tiny")
    cfg.model = SMALL
    save_model(model, cfg, tmp_path, step=1)
    loaded, _, meta = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.embed.weight and meta["step"] == 1
    x = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_loading_a_checkpoint_leaves_the_compiler_unimported(cpu_model, tmp_path):
    """The model a checkpoint fills is built on the meta device computing nothing: torch's meta kernels would import
    torch._dynamo, seconds of the start of every command that loads a model."""
    cfg = get_config("tiny")
    cfg.model = SMALL
    save_model(cpu_model, cfg, tmp_path)
    code = "import sys; from axiom.model.checkpoint import load_model; load_model(sys.argv[1]); print(*sys.modules)"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "torch.nn" in done.stdout.split() and "torch._dynamo" not in done.stdout.split()


def test_checkpoint_that_does_not_fit_its_config_is_a_clear_error(cpu_model, tmp_path):
    model = cpu_model
    import json

    from axiom.errors import AxiomError

    cfg = get_config("tiny")
    cfg.model = SMALL
    save_model(model, cfg, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["n_kv_heads"] = 4  # qkv_proj would need 64 + 2 * 32 rows, the file has 64 + 2 * 16
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(AxiomError, match=r"layers.0.attn.qkv_proj.weight has shape \(64, 32\) but config.json implies"):
        load_model(tmp_path)
    meta["model"]["n_kv_heads"], meta["model"]["n_layers"] = 2, 3
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(AxiomError, match=r"weights do not match config.json: missing \[layers.2.attn.o_proj.weight"):
        load_model(tmp_path)
