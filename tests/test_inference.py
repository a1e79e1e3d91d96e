"""prepare_model and the decode kernels: the same products as torch's (float32 to rounding, int8 within its
quantization error), greedy tokens kept on a small trained model, the fallback without kernels, and the bench's
int8 and llama.cpp options. No timing here: speed lives in `axiom bench generate`."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import micro_config, save_model

import axiom.bench.llamacpp
import axiom.infer.fast
from axiom.cli import main
from axiom.config import Config, ModelConfig, TrainConfig, get_config
from axiom.dtypes import INFERENCE_DTYPES
from axiom.errors import AxiomError
from axiom.infer import kernels
from axiom.infer.fast import (
    DecodeBlock,
    FastLinear,
    Int8Embedding,
    Int8Linear,
    prepare_model,
    quantize_rows,
)
from axiom.infer.generate import generate
from axiom.model.cache import KVCache
from axiom.model.transformer import Axiom, RMSNorm, apply_rope
from axiom.runtime import compile_cache_dir, persistent_compile_cache

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="decode kernels not buildable here")
PROMPTS = [[3, 22, 41], [60, 79, 98, 117], [250]]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained():
    """The micro model after 150 AdamW steps on a fixed cycle of 24 ids (tests/conftest.py's patterned data):
    its next-token distributions are peaked, as a trained model's are, so greedy picks are not coin tosses."""
    torch.manual_seed(0)
    model = Axiom(micro_config().model)
    cycle = torch.tensor([3 + 19 * i for i in range(24)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, 24, (8, 1))
        seq = cycle[(starts + torch.arange(25)) % 24]  # (8, 25)
        loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("rows", [1, 3, 16, 19, 38])  # 19, 38: float32 takes the 4 x 6 tiles, then 3 or 2 rows
@pytest.mark.parametrize("n", [64, 1003])  # 1003: bands and a remainder of fewer than 4 (6 for the tiles) rows
@pytest.mark.parametrize("k", [96, 80])  # 80: not a multiple of 32, so bf16 takes the path without AVX512-BF16
@needs_kernels
def test_kernels_equal_torch(rows, n, k):
    torch.manual_seed(rows * n)
    x, w = torch.randn(rows, k), torch.randn(n, k)
    torch.testing.assert_close(torch.ops.axiom_decode.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)
    xb, wb = x.bfloat16(), w.bfloat16()  # float32 sums of the same bf16 products, rounded once to bf16
    torch.testing.assert_close(torch.ops.axiom_decode.linear(xb, wb), (xb.float() @ wb.float().t()).bfloat16())
    q, scale = quantize_rows(w)
    deq = q.float() * scale[:, None]
    for act in (torch.float32, torch.bfloat16):  # with AVX512-VNNI x is rounded to int16 per row: error < 1e-4
        out, ref = torch.ops.axiom_decode.linear_int8(x.to(act), q, scale), x.to(act).float() @ deq.t()
        assert out.dtype == act
        assert ((out.float() - ref).norm() / ref.norm()).item() < (1e-4 if act == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@needs_kernels
def test_decode_attention_equals_rope_cache_write_and_sdpa(dtype):
    """Three rows at their own positions (one at slot 0): the kernel writes each row's rotated key and its value into
    its slot and returns what the model's RoPE + SDPA give over the row's filled slots."""
    torch.manual_seed(0)
    B, H, Hkv, D, L = 3, 4, 2, 32, 40
    positions = torch.tensor([7, 0, 33])
    qkv = torch.randn(B, (H + 2 * Hkv) * D).to(dtype)
    keys, values = torch.randn(B, Hkv, L, D).to(dtype), torch.randn(B, Hkv, L, D).to(dtype)
    want_keys, want_values = keys.clone(), values.clone()
    cos, sin = (t[positions].to(dtype) for t in axiom.model.transformer.rope_tables(D, L, 10000.0))  # (B, D)
    out = torch.ops.axiom_decode.decode_attention(qkv, keys, values, positions.tolist(), cos, sin, D**-0.5)
    heads = qkv.view(B, H + 2 * Hkv, 1, D)
    qk = apply_rope(heads[:, : H + Hkv], cos[:, None, None], sin[:, None, None])
    for b, p in enumerate(positions.tolist()):
        want_keys[b, :, p], want_values[b, :, p] = qk[b, H:, 0], heads[b, H + Hkv :, 0]
        k, v = want_keys[b : b + 1, :, : p + 1].float(), want_values[b : b + 1, :, : p + 1].float()
        want = torch.nn.functional.scaled_dot_product_attention(qk[b : b + 1, :H].float(), k, v, enable_gqa=True)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out[b].float(), want.reshape(-1), **tol)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # one rounding, not 3
    torch.testing.assert_close(keys, want_keys, **tol)
    assert torch.equal(values, want_values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@needs_kernels
def test_rms_norm_and_silu_mul_kernels_equal_the_modules(dtype):
    torch.manual_seed(0)
    x, gu = (torch.randn(3, 96) * 4).to(dtype), (torch.randn(2, 2 * 88) * 6).to(dtype)  # 88: a remainder under 16
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = (torch.rand(96) + 0.5).to(dtype)
    exact = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(torch.ops.axiom_decode.rms_norm(x, norm.weight, 1e-5), norm(x), **exact)
    gate, up = gu.split(88, dim=-1)
    torch.testing.assert_close(torch.ops.axiom_decode.silu_mul(gu), torch.nn.functional.silu(gate) * up, **exact)


@pytest.mark.parametrize("dtype", INFERENCE_DTYPES)
@needs_kernels
def test_decode_blocks_give_the_blocks_logits_for_rows_at_different_lengths(trained, dtype):
    model = prepare_model(copy.deepcopy(trained), dtype)
    assert all(isinstance(layer, DecodeBlock) for layer in model.layers)
    plain = copy.deepcopy(model)
    plain.layers = torch.nn.ModuleList(layer.block for layer in plain.layers)
    logits = []
    for m in (model, plain):
        cache = KVCache.empty(m.cfg, 2, 16, "cpu", next(m.parameters()).dtype)
        with torch.inference_mode():
            m(torch.tensor([[3, 22, 41], [60, 79, 98]]), cache=cache)
            cache.lengths = [3, 2]  # the second row continues after two tokens: rows at different positions
            logits.append(m(torch.tensor([[117], [250]]), cache=cache).float())
    torch.testing.assert_close(logits[0], logits[1], rtol=0.03, atol=0.03 if dtype != "float32" else 1e-5)


@pytest.mark.parametrize("k", [256, 40])  # 40: no multiple of 16, which torch's int8 kernel reads past (NaN)
def test_int8_rows_are_within_half_a_step_and_products_within_two_percent(k):
    torch.manual_seed(0)
    w, x = torch.randn(300, k) * 0.02, torch.randn(5, k)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (300,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-9).all()
    for act in (torch.float32, torch.bfloat16):
        for rows in (x, x[:1]):  # a prefill's rows and a decoding step's
            out = Int8Linear(q, scale, act)(rows.to(act)).float()
            exact = rows @ w.t()
            assert ((out - exact).norm() / exact.norm()).item() < 0.02  # measured 0.008 (f32) and 0.009 (bf16)


def test_prepare_rejects_an_unknown_dtype():
    with pytest.raises(AxiomError, match="--dtype 'int4': choose one of float32, bfloat16, int8"):
        prepare_model(Axiom(micro_config().model), "int4")


def test_int8_model_stores_the_tied_table_once_and_keeps_its_loss_path(trained):
    model = prepare_model(copy.deepcopy(trained), "int8")
    assert isinstance(model.embed, Int8Embedding) and isinstance(model.lm_head, Int8Linear)
    assert model.embed.q is model.lm_head.q
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    tokens = torch.tensor([PROMPTS[1]])
    with torch.no_grad():  # the loss path multiplies by the dequantized table: close to float32's loss
        loss, ref = model(tokens[:, :-1], tokens[:, 1:]), trained(tokens[:, :-1], tokens[:, 1:])
    assert loss.item() == pytest.approx(ref.item(), rel=0.05, abs=0.05)


@pytest.mark.parametrize("dtype", INFERENCE_DTYPES)
def test_prepare_keeps_greedy_tokens_of_a_trained_model(trained, dtype):
    """Float32 is the same computation up to summation order; bfloat16 and int8 change every logit a little, which
    on this model's peaked distributions (top logit ahead by several units) changes no greedy pick."""
    want = generate(trained, PROMPTS, 20, temperature=0.0)
    model = prepare_model(copy.deepcopy(trained), dtype)
    assert generate(model, PROMPTS, 20, temperature=0.0) == want
    if dtype == "float32":
        x = torch.randn(2, 1, trained.cfg.d_model)
        torch.testing.assert_close(model.logits(x), trained.logits(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 8])  # 20 rows (over FEW_ROWS) and 160 (over TILE_ROWS)
def test_float32_prefill_gives_the_unprepared_logits(trained, device, batch):
    """A prompt's rows take the kernels' tiles (up to TILE_ROWS) or oneDNN's product on CPU, F.linear elsewhere:
    the same logits either way."""
    reference = copy.deepcopy(trained).to(device)  # the module-scoped fixture stays on the CPU
    model = prepare_model(copy.deepcopy(reference), "float32")
    tokens = torch.tensor([PROMPTS[1] * 5] * batch, device=device)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", INFERENCE_DTYPES)
def test_streamed_weights_are_packed_into_one_buffer_and_stay_tied(trained, dtype):
    model = prepare_model(copy.deepcopy(trained), dtype)
    weights = [m.weight if isinstance(m, FastLinear) else m.q for m in model.modules() if hasattr(m, "kernels")]
    storages = {w.untyped_storage().data_ptr() for w in weights}
    assert len(storages) == 1 and all(w.data_ptr() % 64 == 0 for w in weights)
    if dtype == "int8":
        assert model.embed.q is model.lm_head.q
    else:
        assert model.lm_head.weight is model.embed.weight
        assert model.embed.weight.untyped_storage().data_ptr() in storages


@pytest.mark.parametrize("dtype", INFERENCE_DTYPES)
def test_fallback_without_kernels_gives_the_same_tokens(trained, dtype, monkeypatch):
    want = generate(prepare_model(copy.deepcopy(trained), dtype), PROMPTS, 12, temperature=0.0)
    monkeypatch.setattr(axiom.infer.fast.kernels, "available", lambda: False)
    model = prepare_model(copy.deepcopy(trained), dtype)
    assert not any(getattr(m, "kernels", False) for m in model.modules())
    assert generate(model, PROMPTS, 12, temperature=0.0) == want


@needs_kernels
def test_a_head_dim_the_fused_attention_cannot_take_decodes_through_the_plain_blocks(monkeypatch):
    """The fused decoding attention takes head dims in multiples of 16; a model of another (an import, say: head dim
    24 here) decodes through its blocks, as without the kernels (it failed: "qkv's width must be ...")."""
    from axiom.infer.fast import DecodeBlock

    torch.manual_seed(0)
    model = Axiom(micro_config("d_model=48").model).eval()  # 2 heads of 24
    prepared = prepare_model(copy.deepcopy(model), "float32")
    assert not any(isinstance(m, DecodeBlock) for m in prepared.modules())
    got = generate(prepared, PROMPTS, 8, temperature=0.0)
    monkeypatch.setattr(axiom.infer.fast.kernels, "available", lambda: False)
    assert got == generate(prepare_model(copy.deepcopy(model), "float32"), PROMPTS, 8, temperature=0.0)


@needs_kernels
def test_generate_and_chat_decode_a_head_dim_the_fused_attention_cannot_take(tmp_path, capsys, monkeypatch):
    """The commands (and serve, which loads alike: `load_for_inference`) give the text they give without the kernels;
    they failed: `its prefill failed (RuntimeError: qkv's width must be ...)`."""
    m = ModelConfig(d_model=48, n_layers=1, n_heads=2, n_kv_heads=1, ffn_multiple_of=32, max_seq_len=64)  # 2 x 24
    torch.manual_seed(0)
    save_model(Axiom(m), Config(m, TrainConfig()), tmp_path)
    commands = [["generate", "--prompt", "Hello"], ["chat", "--message", "Hello"]]
    args = ["--ckpt", str(tmp_path), "--temperature", "0", "--max-new-tokens", "6"]

    def texts() -> list[str]:
        out = []
        for command in commands:
            assert main([*command, *args]) == 0
            out.append(capsys.readouterr().out)
        return out

    with_kernels = texts()
    monkeypatch.setattr(axiom.infer.fast.kernels, "available", lambda: False)
    assert texts() == with_kernels and all(with_kernels)


# ---- the build: a killed one never blocks a later process; one running elsewhere is waited for, then given up

needs_a_build = pytest.mark.skipif(kernels._usable_here() is not None, reason="decode kernels not buildable here")
AVAILABLE = "import sys; import axiom.infer.kernels as k; k.BUILD_WAIT_S = float(sys.argv[1]); print(k.available())"


def kernels_in(extensions: Path, wait_s: float = 300) -> subprocess.CompletedProcess:
    """`kernels.available()` in a fresh process that builds under `extensions` (TORCH_EXTENSIONS_DIR)."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", AVAILABLE, str(wait_s)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=wait_s + 240)


def test_each_source_and_installation_builds_in_its_own_folder(tmp_path, monkeypatch):
    """The build's folder follows the source's text and path: a changed source is built anew, and two checkouts used
    in turn keep one build each (one shared folder rebuilt the kernels at every switch)."""
    names = {}
    for where, text in [("a", "same"), ("b", "same"), ("c", "changed")]:
        (tmp_path / where).mkdir()
        (source := tmp_path / where / "decode.cpp").write_text(text)
        monkeypatch.setattr(kernels, "SOURCE", source)
        kernels.build_name.cache_clear()
        names[where] = kernels.build_name()
    kernels.build_name.cache_clear()
    assert len(set(names.values())) == 3 and all(re.fullmatch(r"axiom_decode_[0-9a-f]{16}", n) for n in names.values())
    (tmp_path / "a" / "decode.cpp").write_text("changed")
    monkeypatch.setattr(kernels, "SOURCE", tmp_path / "a" / "decode.cpp")
    assert kernels.build_name() != names["a"]
    kernels.build_name.cache_clear()


def test_one_installation_has_one_build_whichever_launcher_runs_it(monkeypatch):
    """`axiom` runs the venv's python3, `python -m axiom.cli` its python: they built the kernels twice."""
    kernels.build_name.cache_clear()
    names = set()
    for launcher in ("/venv/bin/python", "/venv/bin/python3"):
        monkeypatch.setattr(sys, "executable", launcher)
        names.add(kernels.build_name())
        kernels.build_name.cache_clear()
    monkeypatch.setattr(sys, "prefix", "/another/venv")
    names.add(kernels.build_name())
    kernels.build_name.cache_clear()
    assert len(names) == 2  # one per installation


@needs_a_build
def test_a_killed_build_never_blocks_a_later_one(tmp_path):
    """torch's lock file of a build killed mid-way (it used to make every later generate, chat, serve and bench
    wait forever at 0% CPU) and ours of a dead process: the next process builds and loads the kernels."""
    build = tmp_path / kernels.build_name()
    build.mkdir()
    (build / "lock").touch()  # torch's FileBaton, left by a kill
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"command": kernels.BUILDER, "pid": int(gone.stdout), "host": socket.gethostname(), "since": "12:00:00"}
    (tmp_path / f".{kernels.build_name()}.lock").write_text(json.dumps(holder))
    done = kernels_in(tmp_path)
    assert done.stdout == "True\n", done.stderr
    assert "left behind by a build of the decode kernels that was stopped" in done.stderr
    assert f"building the decode kernels for this installation, once (up to a few minutes): {build}\n" in done.stderr
    assert not (build / "lock").exists() and not (tmp_path / f".{kernels.build_name()}.lock").exists()
    assert kernels_in(tmp_path).stderr == ""  # built: the next process only loads


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="reads Linux /proc")
def test_a_compiler_left_working_in_the_build_folder_counts_as_a_build_and_a_shell_there_does_not(tmp_path):
    """A killed build's ninja runs on in the build folder (a build started at once compiled into the same files);
    a process that merely sits there, as a shell would, must not make decoding wait."""
    build = tmp_path / "build"
    build.mkdir()
    ninja = tmp_path / "ninja"  # a program named as the build tool: `comm` is the executable's name
    ninja.write_bytes(Path(shutil.which("sleep")).read_bytes())
    ninja.chmod(0o755)
    procs = [subprocess.Popen([str(program), "30"], cwd=build) for program in (ninja, shutil.which("sleep"))]
    try:
        assert kernels._builders(build, build / "lock") == [procs[0].pid]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert kernels._builders(build, build / "lock") == []


@needs_a_build
@pytest.mark.parametrize("holds", ["our lock", "torch's lock"])
def test_a_build_running_elsewhere_is_awaited_then_decoding_goes_on_without_it(tmp_path, holds):
    """Another process building (under our lock, or torch's alone as an older axiom would): named while we wait,
    and after the wait decoding goes on with torch's kernels; the other build's lock is left to it."""
    build = tmp_path / kernels.build_name()
    build.mkdir()
    hold = (
        f"from axiom.files import output_lock\nwith output_lock({str(build)!r}, {kernels.BUILDER!r}):\n"
        if holds == "our lock"
        else f"with open({str(build / 'lock')!r}, 'x'):\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", f"import time\n{hold}    print('held', flush=True); time.sleep(120)"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:  # leaving waits for it and closes its pipe
        try:
            assert holder.stdout.readline() == "held\n"
            start = time.monotonic()
            done = kernels_in(tmp_path, wait_s=1)
            assert time.monotonic() - start < 60
            assert done.stdout == "False\n", done.stderr
            assert f"waiting for the decode kernels being built by pid {holder.pid}; after 1 s" in done.stderr
            assert re.search(r"unavailable \(still being built by .+ after 1 s\); using torch's kernels", done.stderr)
            assert holds == "our lock" or (build / "lock").exists()
        finally:
            holder.kill()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_compiled_decoding_of_a_prepared_model(trained, dtype, fresh_compiler):
    """torch.compile traces through the kernels (their shape functions) and decodes the same tokens as eager."""
    model = prepare_model(copy.deepcopy(trained), dtype)
    assert generate(model, PROMPTS, 12, temperature=0.0, compile=True) == generate(model, PROMPTS, 12, temperature=0)


def test_persistent_compile_cache_sets_inductors_folder_only_within_its_block(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    folder = compile_cache_dir(tmp_path / "c")
    assert folder == tmp_path / "c" and folder.is_dir()
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # importing torch._dynamo writes inductor's default there
    with persistent_compile_cache(folder):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c")
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before  # the process's environment is left as it was
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "user"))
    assert compile_cache_dir(tmp_path / "other") == tmp_path / "user"  # a folder the user chose is kept


def test_an_engine_compiles_every_step_in_the_one_folder_it_chose(tmp_path, monkeypatch):
    """Compiling happens inside calls of the compiled step: each runs with the engine's cache folder set."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    seen = []

    def compile(step, **options):  # records the folder inductor would read, then runs the step eagerly
        def run(*args):
            seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
            return step(*args)

        return run

    monkeypatch.setattr(torch, "compile", compile)
    torch.manual_seed(0)
    generate(Axiom(micro_config().model).eval(), PROMPTS, 3, temperature=0.0, compile=True)
    ours = str(tmp_path / ".cache" / "axiom" / "inductor")
    assert len(seen) == 2 and set(seen) == {ours} and os.environ.get("TORCHINDUCTOR_CACHE_DIR") != ours


# ---- the bench

BENCH = ["--set", "max_seq_len=40", "--warmup", "0", "--rounds", "1", "--eager", "--prompt-len", "4"]


def test_bench_generate_int8(capsys):
    args = ["bench", "generate", "--preset", "tiny", *BENCH, "--new-tokens", "4", "--dtype", "int8", "--json"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["dtype"] == "int8" and r["tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert 0 < r["first_token_ms"] < 1e3 * r["new_tokens"] / r["tokens_per_s"]  # the prefill: before the call ends


def test_bench_generate_profiles_one_decoding_step(capsys):
    args = ["bench", "generate", "--preset", "tiny", *BENCH, "--new-tokens", "4", "--batch", "2", "--profile"]
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    p = json.loads(out)["decode_step_profile"]
    assert p["steps"] == 8 and p["step_ms"] > 0 and p["profiled_step_ms"] > 0 and p["host_ms"] > 0
    assert p["wait_ms"] == 0 and p["python_ms"] > 0 and "kernels" not in p  # no device to wait for on the CPU
    assert 0 < len(p["top_host_ops"]) <= 8
    assert all(name.startswith(("aten::", "axiom_decode::")) and calls > 0 for name, calls, _ in p["top_host_ops"])
    assert "Self CPU time total" in err  # torch.profiler's table
    assert main(args) == 0
    assert "  decode step  " in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dtype", "int4"], "--dtype 'int4': choose one of float32, bfloat16, int8, float16"),
        (["--vs-llamacpp", "--llamacpp-dir", "/nonexistent"], "--llamacpp-dir /nonexistent: no bin/llama-bench"),
        # each was taken without a word: llama-bench decodes one sequence (the ratio was ~batch times too high)
        (["--vs-llamacpp", "--batch", "4"], "--vs-llamacpp compares one sequence's decoding (llama-bench's)"),
        (["--hf-compile"], "--hf-compile goes with --vs-hf, which is not given"),
        (["--llamacpp-dir", "/x"], "--llamacpp-dir goes with --vs-llamacpp, which is not given"),
        # the requests ended before the timed steps, which timed nothing
        (["--profile", "--prompt-len", "37"], "--profile times decoding steps after the prompt: a prompt of 37 tokens"),
    ],
)
def test_bench_generate_bad_values_give_one_line_errors(flags, message, capsys):
    assert main(["bench", "generate", "--preset", "tiny", *BENCH, "--new-tokens", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bench_generate_counts_what_a_call_does(capsys):
    """The weights are read once a step for every row (the figure was multiplied by the batch); a call's FLOPs
    include its prompts' prefill (a 1,000-token prefill with 2 new tokens counted 2 tokens' work)."""
    from axiom.bench.generate import GenerateBench, call_flops
    from axiom.model.transformer import flops_per_token

    args = ["bench", "generate", "--preset", "tiny", *BENCH, "--new-tokens", "8", "--prompt-len", "4", "--json"]
    assert main([*args, "--batch", "4", "--rounds", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["weight_gb_per_s"] == pytest.approx(r["weight_bytes_per_token"] * r["decode_tokens_per_s"] / 4 / 1e9)
    m = get_config("axiom-380m").model
    settings = dict(rounds=1, warmup=1, seed=0, batch=1, dtype="bfloat16", eager=False)
    s = GenerateBench(**settings, prompt_len=1000, new_tokens=2, vs_hf=False, hf_compile=False, profile=False)
    # the prefill: every layer's matrices for the 1,000 positions, attention over half of them on average, and the
    # output layer for the last position only (its logits are the only ones computed)
    body = 283_165_696 - (2 * m.n_layers + 1) * m.d_model  # the matrices outside the token table
    attention = 4 * m.n_layers * m.n_heads * m.head_dim
    prefill = 1000 * (2 * body + attention * 500) + 2 * m.vocab_size * m.d_model
    assert call_flops(m, s) == pytest.approx(prefill + flops_per_token(m, 1001) / 3)


def test_bench_generate_against_transformers_without_warm_up(capsys):
    pytest.importorskip("transformers")  # --warmup 0: our tokens were compared before any call made them
    assert main(["bench", "generate", "--preset", "tiny", *BENCH, "--new-tokens", "2", "--vs-hf", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["same_tokens_as_hf"] == 1.0


def test_a_gpus_peak_is_found_by_its_whole_name(monkeypatch):
    from axiom.runtime import gpu_peak_flops

    names = [("NVIDIA L40", 181), ("NVIDIA L40S", 362), ("NVIDIA L4", 121), ("NVIDIA H100 80GB HBM3", 989)]
    names += [("NVIDIA H200 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA GH200 480GB", 989), ("NVIDIA H800 PCIe", 756)]
    for name, tflops in names:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert gpu_peak_flops(torch.device("cuda")) == tflops * 1e12, name  # the L40 read as an L4: MFU 1.5x


def test_own_peak_leaves_out_what_was_held_before():
    """The reference's peak memory counted our model, held beside it; it is now what its own work adds."""
    from axiom.bench.timing import OwnPeak, memory_in_use

    if memory_in_use(torch.device("cpu")) is None:
        pytest.skip("no /proc/self/status here: resident memory unknown")
    held = torch.ones(64 << 20, dtype=torch.float32)  # 256 MiB, in use before
    with OwnPeak(torch.device("cpu")) as memory:
        work = torch.ones(32 << 20, dtype=torch.float32)  # 128 MiB
        del work
    assert 100 << 20 < memory.bytes < 200 << 20
    del held


def test_bench_vs_llamacpp_skips_in_one_line_without_llamacpp(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(axiom.bench.llamacpp, "DEFAULT_LLAMACPP", tmp_path / "absent")
    assert main(["bench", "generate", "--preset", "tiny", *BENCH, "--new-tokens", "2", "--vs-llamacpp", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "llamacpp" not in json.loads(out)
    skipped = "--vs-llamacpp skipped (--llamacpp-dir DIR names one)\n"
    assert err == f"axiom bench: llama.cpp not found at {tmp_path / 'absent'}: {skipped}"
    # installed from a wheel there is no checkout to look beside (its default was a path inside site-packages)
    monkeypatch.setattr(axiom.bench.llamacpp, "DEFAULT_LLAMACPP", None)
    assert axiom.bench.llamacpp.find_llamacpp(None) is None
    assert main(["bench", "generate", "--preset", "tiny", *BENCH, "--new-tokens", "2", "--vs-llamacpp", "--json"]) == 0
    assert capsys.readouterr().err == f"axiom bench: llama.cpp not found at ../shared beside a checkout: {skipped}"


def test_a_failed_llamacpp_conversion_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """A converter that dies halfway through its file: one AxiomError with its last line, and the temporary folder
    (the checkpoint, the llama export, the partial GGUF) removed; it was left behind, the error an OSError from
    rmdir."""
    llamacpp = tmp_path / "llama.cpp"
    (llamacpp / "bin").mkdir(parents=True)
    (llamacpp / "bin" / "llama-bench").touch()
    convert = llamacpp / "convert"
    convert.write_text('#!/bin/sh\nprintf GGUF > "$3"\necho "out of memory" >&2\nexit 1\n')
    convert.chmod(0o755)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's cache of the tokenizer file is tiktoken's, not ours
    cfg = micro_config()
    weights = Axiom(cfg.model).state_dict()
    with pytest.raises(AxiomError, match=r"^llama.cpp's converter failed \(out of memory\);"):
        axiom.bench.llamacpp.export_gguf(llamacpp, cfg, weights, "float32")
    assert list(temp.iterdir()) == []


@pytest.mark.slow
def test_bench_vs_llamacpp_times_both_on_the_same_weights(capsys):
    if axiom.bench.llamacpp.find_llamacpp(None) is None:
        pytest.skip("no ../shared/tools/llama.cpp (see shared/tools/llama.cpp/README.md)")
    pytest.importorskip("sentencepiece")  # llama.cpp's converter imports it
    args = ["bench", "generate", "--preset", "tiny", *BENCH, "--new-tokens", "4", "--vs-llamacpp", "--json"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["llamacpp"]["gguf_type"] == "f32"
    assert set(r["ratio_vs_llamacpp"]) == {"decode", "prefill_32"}  # 512 exceeds max_seq_len=40
    assert all(v > 0 for v in r["ratio_vs_llamacpp"].values())


def test_decode_profile_counts_kernels_not_the_profilers_step_range():
    """On CUDA the profiler also puts its "ProfilerStep*" range on the device's timeline: it is no kernel, and
    counting it made the H200's batch-1 step look like 3.75 ms of kernels in a 1.9 ms step."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from axiom.bench.decode_profile import step_figures

    def event(key: str, device: DeviceType, count: int = 1, cpu_us: float = 0.0, device_us: float = 0.0):
        return SimpleNamespace(
            key=key, device_type=device, count=count, self_cpu_time_total=cpu_us, self_device_time_total=device_us
        )

    events = [
        event("ProfilerStep*", DeviceType.CPU, count=2, cpu_us=400.0),
        event("ProfilerStep*", DeviceType.CUDA, count=2, device_us=5000.0),
        event("cudaGraphLaunch", DeviceType.CPU, count=2, cpu_us=1000.0),
        event("nvjet_gemm", DeviceType.CUDA, count=96, device_us=1200.0),
        event("triton_poi_fused_add", DeviceType.CUDA, count=200, device_us=800.0),
    ]
    figures = step_figures(events, 2, (0.0019, 0.0026), cuda=True)
    assert figures["kernels"] == 148 and figures["kernel_ms"] == pytest.approx(1.0)
    assert [k[0] for k in figures["top_kernels"]] == ["nvjet_gemm", "triton_poi_fused_add"]
    assert figures["graph_launches"] == 1 and figures["python_ms"] == pytest.approx(0.2)


def test_padded_output_table_gives_the_same_logits_and_keeps_the_table_tied():
    """What prepare_model does on a GPU: the output product over the table padded to a multiple of 128 rows, the
    logits cut back to the vocabulary; the token table is the padded one's first rows, still stored once."""
    from axiom.infer.fast import PaddedOutput, pad_output_table, weight_bytes_per_token

    torch.manual_seed(0)
    model = Axiom(micro_config("vocab_size=300").model).eval()
    tokens = torch.randint(0, 300, (2, 7))
    read = weight_bytes_per_token(model)
    targets = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        before, loss_before = model(tokens), model(tokens, targets)
        pad_output_table(model)
        after, loss_after = model(tokens), model(tokens, targets)
    assert isinstance(model.lm_head, PaddedOutput) and model.lm_head.padded.shape[0] == 384
    assert after.shape == before.shape == (2, 7, 300)
    torch.testing.assert_close(after, before)
    # the loss (eval's, decode_quality's) is over the vocabulary: the zero rows' logits of 0 were in its softmax
    assert model.lm_head.weight.shape[0] == 300
    torch.testing.assert_close(loss_after, loss_before)
    assert model.embed.weight.data_ptr() == model.lm_head.padded.data_ptr()
    assert not model.lm_head.padded[300:].any()
    assert weight_bytes_per_token(model) == read + 84 * model.cfg.d_model * 4  # the bench counts the padded rows
