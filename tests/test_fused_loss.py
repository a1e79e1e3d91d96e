"""The fused loss kernels (axiom/model/fused_loss.py): liger-kernel's loss equals ours on a CPU under Triton's
interpreter, and both fused kernels do on CUDA; a kernel that cannot run is refused in one line before a run
starts; the plan resolves `loss_kernel=auto`."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import micro_args, micro_config
from packaging.version import Version

from axiom.bench import loss as bench_loss
from axiom.cli import main
from axiom.config import LOSS_KERNELS
from axiom.errors import AxiomError
from axiom.model.fused_loss import FUSED_KERNELS, check_loss_kernel, fused_cross_entropy
from axiom.model.loss import chunked_cross_entropy
from axiom.model.transformer import Axiom
from axiom.train.parallel import Dist, parallelize
from axiom.train.plan import AUTO_LOSS_KERNEL, assumed_gpu, local_hardware, resolve

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


def old_interpreter_on_numpy_2_4() -> bool:
    """Whether Triton's interpreter is one that NumPy 2.4 breaks: it made an index of a one-element array with int(),
    which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars", triton-lang/triton#9171).
    Seen with Triton 3.6; 3.9, the oldest release tried since, works."""
    try:
        triton = Version(metadata.version("triton"))
    except metadata.PackageNotFoundError:  # none, or under another name (a nightly's pytorch-triton): try it
        return False
    return triton < Version("3.9") and Version(metadata.version("numpy")) >= Version("2.4")


# Run in a fresh process: Triton reads TRITON_INTERPRET when liger-kernel's kernels are defined, at its import.
LIGER_ON_CPU = textwrap.dedent(
    """
    import json, torch
    import torch.nn.functional as F
    from axiom.model.fused_loss import fused_cross_entropy
    from axiom.model.transformer import Axiom
    from axiom.train.parallel import Dist, parallelize
    from axiom.train.plan import local_hardware, resolve
    from conftest import micro_config

    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)  # 300 columns: padded to 384 with a multiple of 128
    t = torch.randint(0, 300, (40,))
    t[[3, 17]] = -100  # ignored positions
    ref = F.cross_entropy(h @ w.t(), t)
    ref_grads = torch.autograd.grad(ref, (h, w))
    direct = {}
    for multiple in (1, 128):
        loss = fused_cross_entropy("liger", h, w, t, vocab_multiple=multiple)
        grads = torch.autograd.grad(loss, (h, w))
        direct[multiple] = [abs(loss - ref).item(), *((a - b).abs().max().item() for a, b in zip(grads, ref_grads))]

    cfg = micro_config("vocab_size=300", "loss_kernel=liger")
    planned = resolve(cfg, local_hardware(torch.device("cpu"))).applied(cfg)
    x, y = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    results = {}
    for kernel in ("chunked", "liger"):
        torch.manual_seed(1)
        model = Axiom(cfg.model)
        model.ignored_targets = False
        if kernel == "liger":
            model = parallelize(model, planned.train, torch.device("cpu"), Dist())
        loss = model(x, y)
        loss.backward()
        results[kernel] = (model.loss_kernel, loss.item(), {n: p.grad for n, p in model.named_parameters()})
    (k0, l0, g0), (k1, l1, g1) = results["chunked"], results["liger"]
    grad_diff = max((g0[n] - g1[n]).abs().max().item() for n in g0)
    print(json.dumps({"direct": direct, "kernels": [k0, k1], "model_loss_diff": abs(l0 - l1), "grad_diff": grad_diff}))
    """
)


@pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel is not installed (pip install 'axiom-lm[kernels]')")
@pytest.mark.skipif(
    old_interpreter_on_numpy_2_4(),
    reason="Triton's interpreter before 3.9 fails on NumPy 2.4 (triton-lang/triton#9171): upgrade triton (with torch)",
)
def test_liger_loss_equals_ours_on_cpu_under_the_triton_interpreter():
    """Loss and both gradients equal F.cross_entropy's, with and without the padded vocabulary (its -inf bias) and
    with ignored targets; through the model (`parallelize` sets the planned kernel) every parameter's gradient
    equals the one our chunked loss gives."""
    tests = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(map(str, (tests.parent, tests)))}
    done = subprocess.run(
        [sys.executable, "-c", LIGER_ON_CPU], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for diffs in out["direct"].values():
        assert max(diffs) < 1e-5, out
    assert out["kernels"] == ["chunked", "liger"]
    assert out["model_loss_diff"] < 1e-5 and out["grad_diff"] < 1e-5, out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels run on CUDA (this machine has no GPU)")
@pytest.mark.parametrize("kernel", list(FUSED_KERNELS))
def test_fused_kernels_equal_ours_on_cuda(kernel):
    """bf16 autocast, the card's vocabulary: loss and gradients as ours within bf16's rounding."""
    if importlib.util.find_spec(FUSED_KERNELS[kernel]) is None:
        pytest.skip(f"{FUSED_KERNELS[kernel]} is not installed (pip install 'axiom-lm[kernels]')")
    torch.manual_seed(0)
    h = (torch.randn(2048, 256, device="cuda") * 0.5).requires_grad_()
    w = (torch.randn(100_277, 256, device="cuda") * 0.02).requires_grad_()
    t = torch.randint(0, 100_277, (2048,), device="cuda")
    t[::7] = -100
    results = []
    for fn in (chunked_cross_entropy, lambda *a: fused_cross_entropy(kernel, *a)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, t)
        results.append((loss.float(), *torch.autograd.grad(loss, (h, w))))
    (l0, gh0, gw0), (l1, gh1, gw1) = results
    assert torch.allclose(l0, l1, rtol=1e-2)
    for a, b in ((gh0, gh1), (gw0, gw1)):
        assert torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0) > 0.99


def test_every_loss_kernel_but_ours_names_its_package():
    assert set(FUSED_KERNELS) == set(LOSS_KERNELS) - {"chunked"}


def test_a_fused_kernel_on_a_cpu_is_refused_in_one_line(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # as if installed
    with pytest.raises(AxiomError, match=r"^loss_kernel=cce runs Triton kernels on CUDA only; on cpu use"):
        check_loss_kernel("cce", torch.device("cpu"))
    check_loss_kernel("chunked", torch.device("cpu"))  # ours runs everywhere


def test_a_missing_kernel_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed
    with pytest.raises(AxiomError) as e:
        check_loss_kernel("liger", torch.device("cuda"))
    assert str(e.value) == (
        "loss_kernel=liger needs liger_kernel, which is not installed: pip install 'axiom-lm[kernels]', "
        "or --set loss_kernel=chunked"
    )


def test_train_refuses_an_unrunnable_kernel_before_writing(tiny_data, tmp_path, monkeypatch, capsys):
    """cce on a CPU (its package installed, as far as axiom looks), liger without its package: one line, exit 2,
    before the run directory is made."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    installed = types.ModuleType("cut_cross_entropy")
    installed.__spec__ = importlib.machinery.ModuleSpec("cut_cross_entropy", None)  # what find_spec finds
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", installed)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed
    out = tmp_path / "run"
    for kernel, message in (
        ("cce", "loss_kernel=cce runs Triton kernels on CUDA only; on cpu use --set loss_kernel=chunked (or auto)"),
        (
            "liger",
            "loss_kernel=liger needs liger_kernel, which is not installed: pip install 'axiom-lm[kernels]', or --set "
            "loss_kernel=chunked",
        ),
    ):
        argv = ["train", "--data", tiny_data, "--out", out, "--device", "cpu", *micro_args(f"loss_kernel={kernel}")]
        assert main([str(a) for a in argv]) == 2
        assert capsys.readouterr().err == f"axiom train: error: {message}\n"
        assert not out.exists()


def test_the_plan_resolves_the_loss_kernel():
    """auto is AUTO_LOSS_KERNEL on either device and says so; a kernel asked for stays; the model takes it."""
    cfg = micro_config("loss_kernel=auto")
    for hardware in (local_hardware(torch.device("cpu")), assumed_gpu(80)):
        plan = resolve(cfg, hardware)
        assert plan.loss_kernel == AUTO_LOSS_KERNEL == "chunked" and "loss_kernel" in plan.chosen
        assert plan.to_dict()["loss_kernel"] == "chunked"
    given = resolve(micro_config("loss_kernel=cce"), assumed_gpu(80))
    assert given.loss_kernel == "cce" and "loss_kernel" not in given.chosen
    assert given.applied(micro_config("loss_kernel=cce")).train.loss_kernel == "cce"
    model = parallelize(Axiom(cfg.model), resolve(cfg, assumed_gpu(80)).applied(cfg).train, torch.device("cpu"), Dist())
    assert model.loss_kernel == "chunked"


def test_bench_loss_times_each_runnable_kernel_beside_the_plain_loss(monkeypatch, capsys):
    """On a CPU: ours and the plain loss, agreeing, ours holding far less than the (N, V) logits; the fused kernels
    listed as skipped with the reason. Each kernel runs its one warm-up call (alone, measured) and its one timed
    call: the warm-up ran once more after the measured call, the loss computed twice before any timing."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    monkeypatch.setattr(
        bench_loss, "loss_fn", lambda kernel, made=bench_loss.loss_fn: calls.append(kernel) or made(kernel)
    )
    argv = ["bench", "loss", "--preset", "tiny", "--rows", "256", "--rounds", "1", "--units", "1", "--json"]
    assert main(argv) == 0
    assert calls == ["plain", "chunked"] * 2
    r = json.loads(capsys.readouterr().out)
    assert (r["rows"], r["vocab_size"], r["dtype"]) == (256, 100_277, "float32")
    plain, ours = r["kernels"]["plain"], r["kernels"]["chunked"]
    assert list(r["kernels"]) == ["plain", "chunked"] and sorted(r["skipped"]) == ["cce", "liger"]
    assert "CUDA only" in r["skipped"]["cce"]
    assert ours["loss_diff"] < 1e-5 and ours["grad_hidden_rel_diff"] < 1e-5 and ours["grad_weight_rel_diff"] < 1e-5
    assert plain["speedup_vs_plain"] == 1.0 and ours["tokens_per_s"] == pytest.approx(256e3 / ours["ms"])
    if plain["peak_extra_bytes"] is not None:  # Linux: the process's peak RSS since a reset
        assert plain["peak_extra_bytes"] > 1.5 * ours["peak_extra_bytes"]
