"""Every fast path gives the answer of the plain one: few-row logits, last-position logits, the chunked loss
(fp32, the autocast branch the GPU takes, and the padded vocabulary it runs over), static vs dynamic KV cache,
compiled decoding, left-padded batches, and `axiom bench` comparing like with like. No timing here: speed lives in
`axiom bench`."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from axiom.cli import main
from axiom.config import get_config
from axiom.infer.compiled import decode_one_and_hidden
from axiom.infer.engine import decode_one
from axiom.infer.generate import generate
from axiom.infer.sampling import greedy
from axiom.model.cache import KVCache
from axiom.model.loss import LossWorkspace, chunked_cross_entropy, output_logits, padded_vocab
from axiom.model.transformer import Axiom

SMALL = get_config(
    "tiny", ["vocab_size=1000", "d_model=32", "n_layers=2", "n_heads=4", "n_kv_heads=2", "max_seq_len=48"]
).model
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Axiom(SMALL).eval()


@pytest.mark.parametrize("rows", [1, 3, 16, 17])
@pytest.mark.parametrize("vocab", [1000, 1031])  # 1031 leaves a remainder after the row blocks
def test_output_logits_equal_linear(rows, vocab):
    torch.manual_seed(rows)
    w, x = torch.randn(vocab, 32), torch.randn(1, rows, 32)
    out = output_logits(x, w)
    assert out.shape == (1, rows, vocab)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])  # compiled: as a GPU's step takes it
@pytest.mark.parametrize("vocab", [100_277, 1000, 1031])
def test_greedy_picks_the_first_maximum_like_argmax(vocab, compiled, fresh_compiler):
    torch.manual_seed(vocab)
    logits = torch.randn(5, vocab)
    logits[0, 3] = logits[0, vocab - 2] = 50.0  # a tie across blocks: the first index wins
    logits[1] = 0.0  # all equal
    logits[2, vocab - 1] = 50.0  # the last entry
    logits[3, 672] = logits[3, 673] = 50.0  # a tie astride the first blocks' border (673 entries each at 100,277)
    pick = torch.compile(greedy, fullgraph=True) if compiled else greedy
    assert torch.equal(pick(logits), logits.argmax(dim=-1))


def test_last_only_logits_equal_the_last_row_of_full_logits(model):
    tokens = torch.randint(0, SMALL.vocab_size, (2, 9))
    with torch.no_grad():
        full, last = model(tokens), model(tokens, last_only=True)
    assert last.shape == (2, 1, SMALL.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)


def _loss_and_grads(fn, h, w, t):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, t)
    (2.5 * loss).backward()  # a non-unit upstream gradient, as with gradient accumulation
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 1024])
def test_chunked_loss_value_and_grads_equal_plain_cross_entropy(chunk):
    torch.manual_seed(chunk)
    h, w = torch.randn(40, 16), torch.randn(300, 16) * 0.5
    t = torch.randint(0, 300, (40,))
    t[::5] = -100  # ignored rows count neither in the mean nor in the gradients
    plain = _loss_and_grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t), h, w, t)
    fast = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk), h, w, t)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_loss_without_gradients_computes_the_loss_alone():
    """Evaluation runs under no_grad with the table still a parameter that requires grad: the loss is the plain one,
    and each chunk's one product is its logits (the table's and the hidden states' gradient products were computed
    as in training, then dropped: over half of an evaluation's time at cl100k's vocabulary)."""
    torch.manual_seed(3)
    h, w = torch.randn(40, 16), torch.nn.Parameter(torch.randn(300, 16) * 0.5)
    t = torch.randint(0, 300, (40,))
    products = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                products.append(func._overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Products():
        loss = chunked_cross_entropy(h, w, t, 16, workspace=LossWorkspace())
    assert products == ["mm"] * 3  # 40 rows in chunks of 16: the logits of each
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.detach().t(), t), rtol=1e-5, atol=1e-6)


def test_chunked_loss_reuses_its_cpu_block_without_carrying_state():
    workspace = LossWorkspace()
    torch.manual_seed(2)
    w = torch.randn(300, 16) * 0.5
    for n in (40, 8, 40):  # a big call, a small one inside the kept block, a big one again
        h, t = torch.randn(n, 16), torch.randint(0, 300, (n,))
        fast = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, 16, workspace=workspace), h, w, t)
        plain = _loss_and_grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t), h, w, t)
        for a, b in zip(fast, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert workspace.block is not None and workspace.block.numel() >= 16 * 300
    workspace.release()
    assert workspace.block is None


def test_chunked_loss_under_autocast_follows_the_low_precision_branch():
    # The GPU runs the loss under bf16 autocast: the table is cast once and grads accumulate in fp32.
    torch.manual_seed(1)
    h, w = torch.randn(24, 16), torch.randn(200, 16) * 0.5
    t = torch.randint(0, 200, (24,))
    plain = _loss_and_grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t), h, w, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, 8), h, w, t)
    assert fast[1].dtype == fast[2].dtype == torch.float32
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.01)


def test_chunked_loss_under_autocast_writes_its_gradient_in_one_pass_and_keeps_a_sure_targets_share():
    """Under bf16 autocast the chunk's gradient is the exp of its float32 log-probabilities written in bf16 by one op
    (no in-place exp and then a cast of the whole block), and each target's entry p - 1 is taken in float32 first: a
    target at p = 0.9995, which rounds to 1 in bf16, keeps its -0.0005."""
    torch.manual_seed(4)
    n, vocab, d = 8, 200, 16
    h, w, t = torch.randn(n, d), torch.randn(vocab, d) * 0.1, torch.randint(0, vocab, (n,))
    h[0], w[:, 0] = 0.0, 0.0
    h[0, 0], w[t[0], 0] = 1.0, math.log(199 / 5e-4)  # row 0: logit 12.9 at its target, 0 elsewhere
    plain = _loss_and_grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t), h, w, t)
    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].shape == (n, vocab):
                casts.append((args[0].dtype, out.dtype))
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16), Casts():
        fast = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, n), h, w, t)
    assert casts == [(torch.bfloat16, torch.float32)]  # the logits up; the gradient is not cast down
    sure = plain[1][0, 0].item()  # (p - 1) * 12.9 * 2.5 / n: the only share of row 0's first hidden dimension
    assert sure < -1e-3 and fast[1][0, 0].item() == pytest.approx(sure, rel=0.05)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.01)


@pytest.mark.parametrize("vocab", [300, 256])  # padded to 384; already a multiple of 128, so not padded
@pytest.mark.parametrize("chunk", [7, 1024])
def test_padded_output_product_gives_the_unpadded_loss_and_gradients(vocab, chunk):
    """The GPU's loss runs over the vocabulary padded to a multiple of 128 with the padded columns masked: loss and
    gradients (of the hidden states and of the table) are the unpadded computation's, with ignored targets too, in
    float32 and in the CPU block the workspace keeps; the table's gradient keeps the true vocabulary."""
    torch.manual_seed(vocab + chunk)
    h, w = torch.randn(40, 16), torch.randn(vocab, 16) * 0.5
    t = torch.randint(0, vocab, (40,))
    t[::5] = -100
    t[3] = vocab - 1  # the last true column, next to the padding
    plain = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk, vocab_multiple=1), h, w, t)
    for workspace in (None, LossWorkspace()):
        padded = _loss_and_grads(
            lambda h, w, t, ws=workspace: chunked_cross_entropy(h, w, t, chunk, vocab_multiple=128, workspace=ws),
            h,
            w,
            t,
        )
        assert padded[2].shape == (vocab, 16)
        for a, b in zip(padded, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    reference = _loss_and_grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t), h, w, t)
    for a, b in zip(padded, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_padded_output_product_under_autocast_and_in_the_model():
    """The padded product under bf16 autocast (the GPU's branch) gives the unpadded one's loss and gradients; the
    card's 100,277 columns pad to 100,352; the model's decoding logits keep the true vocabulary."""
    assert padded_vocab(100_277) == 100_352 and padded_vocab(256) == 256
    torch.manual_seed(3)
    h, w = torch.randn(24, 16), torch.randn(200, 16) * 0.5
    t = torch.randint(0, 200, (24,))
    t[::4] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, 8, vocab_multiple=1), h, w, t)
        padded = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, 8, vocab_multiple=128), h, w, t)
    for a, b in zip(padded, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    m = get_config("tiny", ["vocab_size=1000", "d_model=32", "n_layers=1", "n_heads=2", "n_kv_heads=1"]).model
    torch.manual_seed(0)
    model = Axiom(m).eval()
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        logits, hidden = model(x), model.hidden_states(x)
        assert logits.shape == (2, 12, 1000)  # decoding: the true vocabulary, unpadded
        torch.testing.assert_close(logits, F.linear(hidden, model.lm_head.weight), rtol=1e-5, atol=1e-5)
        loss = chunked_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, x.flatten(), vocab_multiple=128)
        torch.testing.assert_close(model(x, x), loss, rtol=1e-6, atol=1e-6)


def test_static_cache_forward_equals_full_recompute(model):
    tokens = torch.randint(0, SMALL.vocab_size, (2, 12))
    cache = KVCache.empty(SMALL, 2, SMALL.max_seq_len, "cpu", torch.float32, static=True)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(5, 12)]
    assert cache.static and cache.positions.tolist() == [12, 12]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("static", [False, True])
def test_left_padded_batch_equals_each_prompt_alone(model, static):
    batch = generate(model, PROMPTS, 12, temperature=0.0, static=static)
    alone = [generate(model, [p], 12, temperature=0.0, static=static)[0] for p in PROMPTS]
    assert batch == alone


def test_static_cache_generation_equals_dynamic(model):
    kw = dict(temperature=0.9, top_k=50, seed=3)
    assert generate(model, PROMPTS, 15, static=True, **kw) == generate(model, PROMPTS, 15, **kw)
    # The reused static cache is emptied between calls: a second, different call is unaffected by the first.
    assert generate(model, PROMPTS[1:2], 15, static=True, **kw) == generate(model, PROMPTS[1:2], 15, **kw)


def test_compiled_decoding_equals_eager(model, fresh_compiler):
    pytest.importorskip("torch._inductor")
    expected = generate(model, PROMPTS, 10, temperature=0.0)
    try:
        compiled = generate(model, PROMPTS, 10, temperature=0.0, compile=True)
    except Exception as e:  # no C++ toolchain for inductor's CPU kernels on this machine
        if "compil" in str(e).lower() and "C++" in str(e):
            pytest.skip(f"torch.compile cannot build CPU kernels here: {str(e).splitlines()[0][:100]}")
        raise
    assert compiled == expected
    assert generate(model, PROMPTS, 10, temperature=0.0, compile=True) == expected  # reuses graph and cache
    # Greedy picks inside the graph; sampling takes the compiled logits; EOS masking works on either.
    eos = expected[0][3]
    assert generate(model, PROMPTS, 10, temperature=0.0, compile=True, eos_id=eos) == generate(
        model, PROMPTS, 10, temperature=0.0, eos_id=eos
    )
    kw = dict(temperature=0.9, top_k=50, seed=3)
    assert generate(model, PROMPTS, 10, compile=True, **kw) == generate(model, PROMPTS, 10, **kw)


def test_batch_1_compiled_decoding_on_cuda_multiplies_in_fused_reductions(fresh_compiler):
    """At batch 1 inductor computes the step's one-row products as fused reductions, not cuBLAS calls (the
    coordinate-descent tuning of axiom.infer.compiled.step_options), and a step of two rows keeps cuBLAS's; both
    decode what eager decoding does."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: inductor turns one-row products into reductions on GPUs only")
    from torch._inductor.utils import run_and_get_code

    cuda_model = Axiom(SMALL).to("cuda").eval()
    for prompts, cublas in ((PROMPTS[:1], False), (PROMPTS[:2], True)):
        expected = generate(cuda_model, prompts, 10, temperature=0.0)
        compiled, code = run_and_get_code(generate, cuda_model, prompts, 10, temperature=0.0, compile=True)
        assert compiled == expected
        assert code and any("extern_kernels.mm(" in graph for graph in code) == cublas


def test_hidden_states_are_forward_before_the_output_layer(model):
    # The compiled step returns the final hidden state beside the logits (so inductor stores it once).
    tokens = torch.randint(0, SMALL.vocab_size, (2, 9))
    caches = [KVCache.empty(SMALL, 2, 16, "cpu", torch.float32, static=s) for s in (False, True)]
    with torch.no_grad():
        hidden = model.hidden_states(tokens, last_only=True)
        assert hidden.shape == (2, 1, SMALL.d_model)
        torch.testing.assert_close(output_logits(hidden, model.lm_head.weight), model(tokens, last_only=True))
        for cache in caches:
            model(tokens, cache=cache, last_only=True)
        logits, step_hidden = decode_one_and_hidden(model, tokens[:, 0], caches[1])
        torch.testing.assert_close(logits, decode_one(model, tokens[:, 0], caches[0]), rtol=1e-5, atol=1e-5)
    assert step_hidden.shape == (2, 1, SMALL.d_model) and caches[1].positions.tolist() == caches[0].lengths == [10, 10]


def test_compiled_model_gives_the_eager_loss_and_gradients():
    # `--set compile=true` training: the chunked loss (an autograd.Function with in-place ops) compiles as well.
    m = get_config("tiny", ["vocab_size=512", "d_model=32", "n_layers=1", "n_heads=2", "n_kv_heads=1"]).model
    torch.manual_seed(0)
    eager, compiled = Axiom(m), Axiom(m)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    losses = [model(x, y) for model in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_chunk_loss_under_autocast_gives_the_eager_values(fresh_compiler):
    """The GPU's compiled training takes each loss chunk through torch.compile under bf16 autocast (with the padded
    vocabulary): the loss and gradients of the eager chunks, to bf16 rounding."""
    torch.manual_seed(5)
    h, w = torch.randn(40, 16), torch.randn(300, 16) * 0.5
    t = torch.randint(0, 300, (40,))
    t[::5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, compiled = (
            _loss_and_grads(
                lambda h, w, t, c=c: chunked_cross_entropy(h, w, t, 16, vocab_multiple=128, compiled=c), h, w, t
            )
            for c in (False, True)
        )
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=0.02, atol=2e-3)


BENCH = ["--set", "vocab_size=512", "--set", "d_model=32", "--set", "n_layers=1", "--set", "n_heads=2"]
BENCH += ["--set", "n_kv_heads=1", "--set", "max_seq_len=32", "--set", "seq_len=16", "--set", "micro_batch_size=2"]


def test_bench_train_compares_the_same_model_and_loss(capsys):
    pytest.importorskip("transformers")
    args = ["bench", "train", "--preset", "tiny", *BENCH, "--vs-hf", "--json"]
    assert main([*args, "--warmup", "1", "--steps", "1", "--rounds", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0
    assert r["ratio_vs_hf"] == pytest.approx(r["tokens_per_s"] / r["hf_tokens_per_s"])
    assert r["mfu"] is None  # no known peak for a CPU
    assert r["hf_params"] == r["params"]  # same shapes, tied table counted once
    assert r["first_loss"] == pytest.approx(r["hf_first_loss"], rel=1e-5)  # same weights, same batch, same loss
    assert len(r["rounds_tokens_per_s"]) == len(r["hf_rounds_tokens_per_s"]) == 2


def test_bench_generate_decodes_the_same_tokens_as_transformers(capsys):
    pytest.importorskip("transformers")
    args = ["bench", "generate", "--preset", "tiny", *BENCH, "--vs-hf", "--json", "--rounds", "1", "--eager"]
    assert main([*args, "--batch", "2", "--prompt-len", "4", "--new-tokens", "8"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["same_tokens_as_hf"] == 1.0
    assert {"tokens_per_s", "mfu", "peak_mem_bytes", "hf_tokens_per_s", "ratio_vs_hf"} <= set(r)


def test_bench_generate_in_bfloat16_the_gpu_default(capsys):
    pytest.importorskip("transformers")
    args = ["bench", "generate", "--preset", "tiny", *BENCH, "--vs-hf", "--json", "--rounds", "1", "--eager"]
    assert main([*args, "--dtype", "bfloat16", "--prompt-len", "4", "--new-tokens", "4"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["dtype"] == "bfloat16" and r["tokens_per_s"] > 0 and 0.0 <= r["same_tokens_as_hf"] <= 1.0


def test_bench_generate_times_the_cpus_eager_path_by_default_and_says_so(capsys):
    # `axiom generate` decodes on the CPU with the eager fast path; the compiled step is slower there (and compiles)
    args = ["bench", "generate", "--preset", "tiny", *BENCH, "--rounds", "1", "--prompt-len", "4", "--new-tokens", "4"]
    assert main([*args, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["decoding"] == "eager (dynamic cache)" and r["compile"] is False and r["flex_attention"] is False
    assert main(args) == 0
    assert "  decoding      eager (dynamic cache), float32, batch 1\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--eager", "--compile"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_generate_compiles_when_asked(capsys):
    pytest.importorskip("torch._inductor")
    args = ["bench", "generate", "--preset", "tiny", *BENCH, "--rounds", "1", "--prompt-len", "4", "--new-tokens", "4"]
    assert main([*args, "--compile", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["decoding"] == "compiled (static cache; CUDA graphs on a GPU)" and r["compile"] is True
    assert r["flex_attention"] is (r["device"] == "cuda")  # on a CPU the compiled step keeps SDPA (FLEX_DEVICES)


def test_bench_rejects_a_generation_longer_than_the_context(capsys):
    assert main(["bench", "generate", "--preset", "tiny", *BENCH, "--prompt-len", "30", "--new-tokens", "8"]) == 2
    assert "exceeds max_seq_len=32" in capsys.readouterr().err
