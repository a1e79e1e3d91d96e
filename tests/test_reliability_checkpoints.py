"""Checkpoints verify: content hashes, the newest checkpoint that verifies, corrupt or non-finite weights on every
load path, finite-only writes, and the tied table handled in one place (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import shutil
import zipfile

import pytest
import torch
from conftest import save_model
from reliability_helpers import copy_run, fails, hashes, make_run, succeeds
from safetensors.torch import load_file, save_file

from axiom.errors import AxiomError
from axiom.model.checkpoint import (
    CHECKSUMS,
    load_model,
    load_training_state,
    newest_valid_checkpoint,
    save_weights,
    stored_tensors,
    verify_checkpoint,
)
from axiom.model.transformer import EMBED, HEAD, Axiom, tie, untie

pytest.importorskip("transformers", reason="export writes transformers' files: pip install 'axiom-lm[hf]'")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("reliability-checkpoints"))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garble(path):
    path.write_bytes(os.urandom(path.stat().st_size))


def flip(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def test_checkpoints_carry_content_hashes_and_resume_finds_the_newest_that_verifies(run, tmp_path):
    r = copy_run(run, tmp_path / "run")
    root = r / "checkpoints"
    record = json.loads((root / "step_000004" / CHECKSUMS).read_text())
    assert sorted(record["files"]) == ["config.json", "model.safetensors", "state.pt"]
    assert verify_checkpoint(root / "step_000004", need_state=True).model.d_model == 32
    assert newest_valid_checkpoint(root) == (root / "step_000004", [])
    # a flipped bit in the data of the newest (the safetensors header still parses): the hash catches it
    flip(root / "step_000004" / "model.safetensors")
    found, skipped = newest_valid_checkpoint(root)
    assert found == root / "step_000002"
    assert [(p.name, "content differs from its SHA-256" in why) for p, why in skipped] == [("step_000004", True)]
    # older checkpoints without checksums.json: the safetensors header and state.pt's zip CRCs are checked
    for name in ("step_000002", "step_000004"):
        (root / name / CHECKSUMS).unlink()
    truncate(root / "step_000004" / "model.safetensors", 0.9)
    assert newest_valid_checkpoint(root)[0] == root / "step_000002"
    flip(root / "step_000002" / "state.pt", offset=200)
    found, skipped = newest_valid_checkpoint(root)
    assert found is None and "state.pt" in skipped[1][1]
    with zipfile.ZipFile(root / "step_000002" / "state.pt") as z:
        assert z.testzip() is not None
    # a missing state.pt, an unreadable config.json
    (root / "step_000006").mkdir()
    (root / "step_000006" / "config.json").write_text("{")
    reasons = [why for _, why in newest_valid_checkpoint(root)[1]]
    assert "config.json: not valid JSON" in reasons[0]
    garble(root / "step_000002" / "state.pt")
    with pytest.raises(
        AxiomError, match="state.pt cannot be read .*resume from an earlier checkpoint with --resume-from"
    ):
        load_training_state(root / "step_000002")


def test_corrupt_or_non_finite_weights_fail_in_one_line_on_every_load_path(run, tiny_data, tmp_path, capsys):
    src = run / "checkpoints" / "best"

    def case(name, mutate, drop_checksums=False):
        d = tmp_path / name
        shutil.copytree(src, d)
        if drop_checksums:
            (d / CHECKSUMS).unlink()
        mutate(d / "model.safetensors")
        return d

    def nan_weights(path):
        state = load_file(path)
        state["norm.weight"][3] = float("nan")
        save_file(state, path)

    def int8_weights(path):
        state = load_file(path)
        state["norm.weight"] = state["norm.weight"].to(torch.int8)
        save_file(state, path)

    cases = {
        "truncated": (case("truncated", truncate), "records"),
        "garbage": (
            case("garbage", garble),
            "content differs from its SHA-256 in checksums.json (corrupt); use another checkpoint",
        ),
        "old-truncated": (case("old-truncated", truncate, True), "not a readable safetensors file"),
        "old-garbage": (case("old-garbage", garble, True), "not a readable safetensors file"),
        "nan": (
            case("nan", nan_weights, True),
            "norm.weight holds 1 non-finite values (NaN or inf); these weights are unusable (from a diverged run?)",
        ),
        "int8": (case("int8", int8_weights, True), "norm.weight holds int8; weights are float32, bfloat16"),
        # a step checkpoint the run pruned meanwhile (it said config.json was not found)
        "gone": (tmp_path / "step_000003", "step_000003 no such file or directory; pass a checkpoint directory"),
    }
    before = hashes(tmp_path)
    for d, message in cases.values():
        fails(capsys, ["eval", "--ckpt", d, "--data", tiny_data, "--device", "cpu"], str(d), message)
        fails(capsys, ["generate", "--ckpt", d, "--prompt", "hi", "--max-new-tokens", "2"], message)
        fails(capsys, ["export", "--ckpt", d, "--out", tmp_path / "export"], message)
    assert not (tmp_path / "export").exists() and hashes(tmp_path) == before
    # an HF folder with non-finite weights is not imported; a corrupt one is one line
    hf = tmp_path / "hf"
    succeeds(capsys, ["export", "--ckpt", src, "--out", hf])
    state = load_file(hf / "model.safetensors")
    state["norm.weight"][0] = float("inf")
    save_file(state, hf / "model.safetensors")
    fails(capsys, ["import", "--hf", hf, "--out", tmp_path / "imp"], "norm.weight holds 1 non-finite values")
    truncate(hf / "model.safetensors")
    fails(capsys, ["import", "--hf", hf, "--out", tmp_path / "imp"], "is not a readable safetensors file")
    assert not (tmp_path / "imp").exists()


def test_non_finite_weights_are_never_written_and_a_non_finite_loss_is_an_error(
    run, tiny_data, tmp_path, capsys, monkeypatch
):
    model, cfg, _ = load_model(run / "checkpoints" / "best")
    with torch.no_grad():
        model.layers[0].attn.o_proj.weight[0, 0] = float("inf")
    (tmp_path / "c").mkdir()
    with pytest.raises(AxiomError, match="refusing to write: layers.0.attn.o_proj.weight holds 1 non-finite"):
        save_model(model, cfg, tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []
    # finite weights whose loss is not finite (e.g. overflow in low precision): `axiom eval` exits 2, not "nan"
    monkeypatch.setattr(Axiom, "forward", lambda self, x, y=None, **kw: torch.tensor(float("nan")))
    best = run / "checkpoints" / "best"
    fails(capsys, ["eval", "--ckpt", best, "--data", tiny_data], "the validation loss is nan (not finite)")


def test_the_tied_table_is_stored_once_and_retied_in_one_place(run, tmp_path):
    model, cfg, _ = load_model(run / "checkpoints" / "best")
    assert model.lm_head.weight is model.embed.weight  # re-tied by `tie`
    stored = stored_tensors(model)
    assert HEAD not in stored and EMBED in stored
    assert untie(stored, tied=True) is stored  # nothing to drop
    twice = {**stored, HEAD: stored[EMBED].clone()}  # some writers store the table twice: equal copies are fine
    assert untie(twice, tied=True).keys() == stored.keys()
    with pytest.raises(AxiomError, match="lm_head.weight differs from embed.weight"):
        untie({**stored, HEAD: stored[EMBED] + 1}, tied=True, where="x")
    (tmp_path / "a").mkdir()
    save_weights(stored, cfg, tmp_path / "a")  # the stored form (as import passes it) saves as the full one does
    (tmp_path / "b").mkdir()
    save_model(model, cfg, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    again = tie(load_model(tmp_path / "a")[0])
    assert again.lm_head.weight is again.embed.weight
