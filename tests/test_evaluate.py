"""Evaluation numbers against a plain reference, the `axiom eval` command, and `axiom plot`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import micro_config, save_model

from axiom.cli import main
from axiom.data import loader
from axiom.data.loader import eval_batches
from axiom.eval.loss import evaluate, perplexity, token_byte_lengths
from axiom.model.transformer import Axiom
from axiom.text.tokenizer import EOS_ID, load_tokenizer
from axiom.train.plot import plot_run


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    cfg = micro_config()
    torch.manual_seed(0)
    model = Axiom(cfg.model)
    path = tmp_path_factory.mktemp("ckpt")
    save_model(model, cfg, path, step=7, tokens=896)
    return model, cfg, path


def test_token_byte_lengths_match_the_tokenizer():
    enc = load_tokenizer()
    lengths = token_byte_lengths()
    assert lengths[EOS_ID] == 0
    for text in ["Hello, world!", "naïve café — 日本語", "def f(x):\n    return x"]:
        ids = enc.encode_ordinary(text)
        assert int(lengths[torch.tensor(ids)].sum()) == len(text.encode("utf-8"))


def test_perplexity_is_exp_of_the_loss_up_to_inf():
    """A diverged model's perplexity is inf, not exp(700) for every loss past 700 nats (eval.csv, axiom eval)."""
    assert perplexity(2.5) == math.exp(2.5) and perplexity(709.0) == math.exp(709.0)
    assert perplexity(709.8) == math.inf and perplexity(4269.5) == math.inf
    assert math.isnan(perplexity(math.nan))


def test_evaluate_matches_plain_cross_entropy(micro_ckpt, tiny_data):
    model, cfg, _ = micro_ckpt
    result = evaluate(model, tiny_data, seq_len=32, batch_size=3, eval_tokens=200)
    xs, ys = zip(*eval_batches(tiny_data, 32, 3, 200), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (6, 32) and result.tokens == 192  # 200 // 32 whole windows
    with torch.no_grad():
        logits = model(x)
    ref = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    nbytes = len(load_tokenizer().decode_bytes(y.flatten().tolist()))  # tiny_data holds no EOS
    assert result.bytes == nbytes
    assert result.loss == pytest.approx(ref / 192, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(ref / 192), rel=1e-5)
    assert result.bpb == pytest.approx(ref / math.log(2) / nbytes, rel=1e-5)
    assert model.training  # evaluate restores the mode it found
    grad = []
    hook = model.register_forward_pre_hook(lambda *_: grad.append(torch.is_grad_enabled()))
    evaluate(model, tiny_data, seq_len=32, batch_size=3, eval_tokens=200)
    hook.remove()
    assert grad == [False, False]  # no autograd graph kept for an evaluation


def test_eval_command_json(micro_ckpt, tiny_data, capsys):
    model, cfg, path = micro_ckpt
    assert main(["eval", "--ckpt", str(path), "--data", str(tiny_data), "--json", "--eval-tokens", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = evaluate(model, tiny_data, seq_len=32, batch_size=2, eval_tokens=200)
    assert out["step"] == 7 and out["tokens_seen"] == 896 and out["tokens"] == 192
    assert out["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert out["bpb"] == pytest.approx(expected.bpb, rel=1e-6)
    assert main(["eval", "--ckpt", str(path), "--data", str(tiny_data), "--eval-tokens", "200"]) == 0
    assert f"val loss {expected.loss:.4f}" in capsys.readouterr().out


def test_eval_reads_the_data_manifest_once(micro_ckpt, tiny_data, monkeypatch, capsys):
    """`axiom eval --data` read manifest.json four times: to check it, for document masking, for the kind of data
    and for the val split."""
    reads = []
    read_json = loader.read_json
    monkeypatch.setattr(loader, "read_json", lambda path, *a: reads.append(path) or read_json(path, *a))
    assert main(["eval", "--ckpt", str(micro_ckpt[2]), "--data", str(tiny_data), "--eval-tokens", "200"]) == 0
    assert reads == [tiny_data / "manifest.json"]


def test_eval_json_of_a_diverged_model_is_json(micro_ckpt, tiny_data, tmp_path, capsys):
    """A finite loss past ~709.8 nats has an infinite perplexity: null in --json (Python wrote Infinity, which JSON
    readers refuse)."""
    model, cfg, _ = micro_ckpt
    diverged = Axiom(cfg.model)
    diverged.load_state_dict(model.state_dict())
    with torch.no_grad():
        diverged.embed.weight.mul_(3000.0)  # the tied output layer: logits in the tens of thousands
    save_model(diverged, cfg, tmp_path, step=7)
    assert main(["eval", "--ckpt", str(tmp_path), "--data", str(tiny_data), "--json", "--eval-tokens", "200"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"not JSON: {name}"))
    assert math.isfinite(out["loss"]) and out["loss"] > 710 and out["ppl"] is None


def test_eval_command_bad_data_is_one_line_error(micro_ckpt, tmp_path, capsys):
    _, _, path = micro_ckpt
    assert main(["eval", "--ckpt", str(path), "--data", str(tmp_path)]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


def test_plot_writes_png(tmp_path):
    (tmp_path / "eval.csv").write_text(
        "step,tokens,train_loss,val_loss,val_ppl,val_bpb,lr,elapsed_s,tokens_per_s\n"
        "0,0,nan,11.5,98715.8,4.0,0.0,0.0,nan\n10,1280,9.0,8.5,4914.8,3.0,0.001,1.0,1280.0\n"
    )
    (tmp_path / "train.csv").write_text(
        "step,tokens,loss,grad_norm,lr,tokens_per_s,skipped\n5,640,10.0,1.0,0.001,100.0,0\n10,1280,9.0,1.0,0.001,100.0,0\n"
    )
    out = plot_run(tmp_path)
    assert out == tmp_path / "loss.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--choices", "1"], "--choices 1: must be at least 2"),  # items the scorer then refused
        (["--choices", "0"], "--choices 0: must be at least 2"),  # a ValueError traceback
        (["--items", "-3"], "--items -3: must be at least 1"),  # wrote items anyway
        (["--ending-words", "-1"], "--ending-words -1: must be at least 0"),
    ],
)
def test_make_choices_refuses_flags_out_of_range(tmp_path, flags, error):
    script = Path(__file__).parents[1] / "scripts" / "make_choices.py"
    cmd = [sys.executable, str(script), "--data", str(tmp_path), "--out", str(tmp_path / "x.jsonl"), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.rstrip().endswith(f"error: {error}")
    assert list(tmp_path.iterdir()) == []


def test_a_scripts_error_is_one_line(tmp_path):
    """Scripts end an AxiomError as the commands do (decode_quality.py and others printed its traceback)."""
    for script, args in [
        ("make_choices.py", ["--out", str(tmp_path / "x.jsonl")]),
        ("decode_quality.py", ["--ckpt", str(tmp_path)]),
    ]:
        cmd = [sys.executable, str(Path(__file__).parents[1] / "scripts" / script), "--data", str(tmp_path), *args]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"{script}: error: ")
