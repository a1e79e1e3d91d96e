"""`axiom export --format gguf` without llama.cpp: metadata, tokenizer, tensors, dtypes and bad input.

Most checks read the gguf.GGUFWriter that `gguf_writer` fills before anything is written; one export is read
back from disk with the gguf package's reader (slow: it parses 330k token and merge strings one by one).
tests/test_llamacpp.py runs the files in llama.cpp itself.
"""

import contextlib
import dataclasses
import errno
import json
import os

import numpy as np
import pytest
import torch
from conftest import save_model

from axiom import __version__
from axiom.cli import main
from axiom.config import Config, ModelConfig, TrainConfig
from axiom.errors import AxiomError
from axiom.files import file_mode
from axiom.interop.export import export, resolve_dtype
from axiom.interop.gguf import GGUF_NAMES, gguf_name, gguf_writer, interleave_rope_rows, leading_fields
from axiom.interop.hf.names import llama_names, to_llama
from axiom.interop.hf.tokenizer import tokenizer_json
from axiom.model.checkpoint import load_model
from axiom.model.transformer import Axiom, apply_rope, rope_tables
from axiom.text.tokenizer import EOS_ID, VOCAB_SIZE

gguf = pytest.importorskip("gguf", reason="--format gguf needs the gguf package: pip install 'axiom-lm[gguf]'")

FULL = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_multiple_of=64, max_seq_len=128)
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_* numbers
MATRIX_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "bf16": "BF16"}
# largest difference of a dequantized matrix from the float32 weights, relative to the matrix's largest entry:
# bfloat16 keeps 8 significant bits, float16 11; q8_0 rounds each block of 32 to 1/127 of its largest entry
DEQUANT_RTOL = {"f32": 0.0, "bf16": 2**-8, "f16": 2**-11, "q8_0": 1 / 254 + 1e-3}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "ckpt"
    path.mkdir()
    torch.manual_seed(0)
    save_model(Axiom(FULL), Config(FULL, TrainConfig()), path, step=7)
    return path


@pytest.fixture(scope="module")
def state(ckpt):
    return load_model(ckpt)[0].state_dict()


@pytest.fixture(scope="module")
def writer(state):
    """writer(dtype) -> the filled gguf.GGUFWriter for the random checkpoint, built once per dtype."""
    cache = {}

    def get(dtype: str):
        if dtype not in cache:
            cache[dtype] = gguf_writer(state, FULL, dtype, "model")
        return cache[dtype]

    return get


def kv(w, key):
    return w.kv_data[0][key].value


def tensors(w) -> dict:
    return w.tensors[0]


def test_tensor_names_are_llama_cpps():
    """Our explicit table against the gguf package's own name map for the llama architecture."""
    untied = dataclasses.replace(FULL, tie_embeddings=False)
    theirs = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, untied.n_layers)
    names = [name for parts in llama_names(untied).values() for name in parts]
    assert len(names) == 3 + 9 * untied.n_layers
    for name in names:
        assert gguf_name(name) == theirs.get_name(name, try_suffixes=(".weight",)), name
    assert {gguf_name(n).replace(".1.", ".{i}.") for n in names if ".0." not in n} == set(GGUF_NAMES.values())


def test_interleaved_rope_rows_give_the_same_rotation():
    """RoPE on llama.cpp's adjacent pairs of the reordered rows = our rotate-half RoPE, rows reordered the same way."""
    n_heads, hd, d, T = 4, 16, 64, 10
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(n_heads * hd, d, generator=g).double(), torch.randn(T, d, generator=g).double()
    cos, sin = (t.double() for t in rope_tables(hd, T, 10_000.0))  # (T, hd): the same angle twice, [a, a]
    ours = apply_rope((x @ w.T).view(T, n_heads, hd).transpose(0, 1), cos, sin)  # (H, T, hd)

    pairs = (x @ interleave_rope_rows(w, n_heads).T).view(T, n_heads, hd // 2, 2).transpose(0, 1)  # (H, T, hd/2, 2)
    a, b, c, s = pairs[..., 0], pairs[..., 1], cos[:, : hd // 2], sin[:, : hd // 2]
    theirs = torch.stack([a * c - b * s, a * s + b * c], dim=-1).transpose(0, 1).reshape(T, n_heads * hd)
    reordered = interleave_rope_rows(ours.transpose(0, 1).reshape(T, n_heads * hd).T, n_heads).T
    assert torch.allclose(theirs, reordered, rtol=0, atol=1e-12)


EXPECTED_KV = {
    "general.architecture": "llama",
    "general.name": "model",
    "general.file_type": 0,
    "llama.vocab_size": VOCAB_SIZE,
    "llama.context_length": 128,
    "llama.embedding_length": 64,
    "llama.block_count": 2,
    "llama.feed_forward_length": FULL.ffn_dim,
    "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2,
    "llama.attention.key_length": 16,
    "llama.attention.value_length": 16,
    "llama.rope.dimension_count": 16,
    "llama.rope.freq_base": FULL.rope_theta,
    "llama.attention.layer_norm_rms_epsilon": FULL.norm_eps,
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "dbrx",
    "tokenizer.ggml.eos_token_id": EOS_ID,
    "tokenizer.ggml.bos_token_id": EOS_ID,
    "tokenizer.ggml.padding_token_id": EOS_ID,
    "tokenizer.ggml.add_bos_token": False,
    "tokenizer.ggml.add_eos_token": False,
}


def test_metadata_tokenizer_and_tensors(writer, state):
    w = writer("f32")
    assert {k: kv(w, k) for k in EXPECTED_KV} == EXPECTED_KV
    assert "tokenizer.chat_template" not in w.kv_data[0] and "tokenizer.ggml.eot_token_id" not in w.kv_data[0]

    tokens, types = kv(w, "tokenizer.ggml.tokens"), kv(w, "tokenizer.ggml.token_type")
    spec = json.loads(tokenizer_json())
    assert len(tokens) == len(types) == VOCAB_SIZE
    assert tokens[:3] == ["!", '"', "#"] and tokens[220] == "Ġ" and tokens[9906] == "Hello"
    assert (tokens[EOS_ID], types[EOS_ID]) == ("<|endoftext|>", gguf.TokenType.CONTROL)
    assert (tokens[100265], types[100265]) == ("[PAD100265]", gguf.TokenType.UNUSED)  # unused in cl100k_base
    assert types.count(gguf.TokenType.CONTROL) == 5 and types.count(gguf.TokenType.UNUSED) == VOCAB_SIZE - 100261
    merges = kv(w, "tokenizer.ggml.merges")
    assert len(merges) == len(spec["model"]["merges"]) and merges[0] == "Ġ Ġ"

    # tensors: llama.cpp's names, no output.weight (tied), values as ours with q and k rows reordered
    llama = to_llama({k: v for k, v in state.items() if k != "lm_head.weight"}, FULL)
    assert set(tensors(w)) == {gguf_name(n) for n in llama} and "output.weight" not in tensors(w)
    for name, want in llama.items():
        t = tensors(w)[gguf_name(name)]
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            want = interleave_rope_rows(want, FULL.n_heads if "q_proj" in name else FULL.n_kv_heads)
        assert t.dtype.name == "F32" and torch.equal(torch.from_numpy(t.tensor), want), name


def test_file_on_disk_reads_back(ckpt, writer):
    """The CLI's file, read by the gguf package's reader: the same metadata and tensors as the writer held."""
    out = ckpt.parent / "model.gguf"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", "gguf"]) == 0
    r, w = gguf.GGUFReader(out), writer("f32")
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert fields.keys() == w.kv_data[0].keys()
    assert all(fields[k] == pytest.approx(kv(w, k)) for k in EXPECTED_KV if isinstance(kv(w, k), float))
    assert fields["tokenizer.ggml.tokens"] == kv(w, "tokenizer.ggml.tokens")
    assert fields["tokenizer.ggml.merges"] == kv(w, "tokenizer.ggml.merges")
    for t in r.tensors:
        want = tensors(w)[t.name].tensor
        assert list(t.shape) == list(reversed(want.shape)) and (t.data.reshape(want.shape) == want).all(), t.name
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("dtype", ["bf16", "f16", "q8_0"])
def test_dtypes_quantize_matrices_and_keep_norms_float32(dtype, writer):
    w, ref = writer(dtype), tensors(writer("f32"))
    assert kv(w, "general.file_type") == FILE_TYPES[dtype]
    for name, t in tensors(w).items():
        want = torch.from_numpy(ref[name].tensor).reshape(-1)
        if name.endswith("norm.weight"):
            assert t.dtype.name == "F32"
            continue
        assert t.dtype.name == MATRIX_TYPES[dtype], name
        got = torch.from_numpy(gguf.quants.dequantize(t.tensor, t.dtype).copy()).reshape(-1).float()
        assert (got - want).abs().max() <= DEQUANT_RTOL[dtype] * want.abs().max(), name
    nbytes = {d: sum(t.nbytes for t in tensors(writer(d)).values()) for d in ("f32", dtype)}
    assert nbytes[dtype] / nbytes["f32"] == pytest.approx({"bf16": 0.5, "f16": 0.5, "q8_0": 34 / 128}[dtype], rel=0.01)


def test_untied_output_layer_is_stored():
    untied = dataclasses.replace(FULL, tie_embeddings=False)
    w = gguf_writer(Axiom(untied).state_dict(), untied, "q8_0")
    assert {"output.weight", "token_embd.weight"} <= tensors(w).keys()


def test_chat_template_names_chatml_tokens_and_ends_turns_at_im_end(state):
    w = gguf_writer(state, FULL, "f32", "chat", template="{{ messages }}")
    assert kv(w, "tokenizer.chat_template") == "{{ messages }}"
    assert kv(w, "tokenizer.ggml.eot_token_id") == 100265 and kv(w, "tokenizer.ggml.eos_token_id") == EOS_ID
    tokens, types = kv(w, "tokenizer.ggml.tokens"), kv(w, "tokenizer.ggml.token_type")
    assert tokens[100264:100266] == ["<|im_start|>", "<|im_end|>"]
    assert types[100264:100266] == [gguf.TokenType.CONTROL] * 2


def test_chat_checkpoint_gets_axiom_chat_template(ckpt, tmp_path, monkeypatch):
    """A checkpoint whose config.json says "chat_template": "chatml" (contract 1) carries axiom.text.chatml's
    template."""
    chat = tmp_path / "chat-ckpt"
    chat.mkdir()
    for f in ckpt.iterdir():
        (chat / f.name).write_bytes(f.read_bytes())
    meta = json.loads((chat / "config.json").read_text())
    (chat / "config.json").write_text(json.dumps({**meta, "chat_template": "mistral"}))
    with pytest.raises(AxiomError, match="chat_template 'mistral' is not known"):
        export(chat, tmp_path / "x.gguf", "gguf")
    import axiom.text.chatml as module

    (chat / "config.json").write_text(json.dumps({**meta, "chat_template": "chatml"}))
    monkeypatch.setattr("axiom.interop.gguf.write_gguf", lambda *args: args)  # what export would write
    state, m, out, dtype, name, template = export(chat, tmp_path / "chat.gguf", "gguf")
    assert template == module.CHAT_TEMPLATE
    assert kv(gguf_writer(state, m, template=template), "tokenizer.ggml.eot_token_id") == 100265  # IM_END


def test_dtype_spellings():
    assert [resolve_dtype("gguf", d) for d in ("float32", "bfloat16", "float16", "q8_0")] == [
        "f32",
        "bf16",
        "f16",
        "q8_0",
    ]
    assert [resolve_dtype("gguf", d) for d in ("f32", "bf16", "f16", "int8")] == ["f32", "bf16", "f16", "q8_0"]
    assert [resolve_dtype("llama", d) for d in ("float32", "bf16")] == ["f32", "bf16"]
    with pytest.raises(
        AxiomError,
        match=r"--dtype q8_0: --format llama writes float32 \(f32\) or bfloat16 \(bf16\); "
        r"float16 \(f16\) and int8 \(q8_0\) are for --format gguf$",
    ):
        resolve_dtype("llama", "q8_0")
    with pytest.raises(
        AxiomError,
        match=r"--dtype int4: --format gguf writes float32 \(f32\), bfloat16 \(bf16\), float16 \(f16\) or "
        r"int8 \(q8_0\)$",
    ):
        resolve_dtype("gguf", "int4")


def test_bad_output_paths_fail_in_one_line(ckpt, tmp_path, capsys):
    def run(*args):
        code = main(["export", "--ckpt", str(ckpt), "--format", "gguf", *args])
        err = capsys.readouterr().err
        assert err.count("\n") <= 1
        return code, err

    folder = tmp_path / "folder"
    folder.mkdir()
    message = (
        f"axiom export: error: --out {folder} is a directory; --format gguf writes one file, e.g. --out model.gguf"
    )
    assert run("--out", str(folder)) == (2, message + "\n")
    code, err = run("--out", str(tmp_path / "m.gguf"), "--dtype", "f16")
    assert code == 0 and (tmp_path / "m.gguf").is_file()
    assert run("--out", str(tmp_path / "m.gguf"))[1].endswith("exists; pass --force to replace it\n")
    assert run("--out", str(tmp_path / "m.gguf"), "--force")[0] == 0
    assert (tmp_path / "m.gguf").stat().st_size > 25_000_000  # replaced by the f32 export (the f16 one is ~19 MB)
    assert "lies inside --ckpt" in run("--out", str(ckpt / "model.gguf"))[1]
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a model")
    assert run("--out", str(foreign), "--force")[1].endswith(
        "is not a GGUF file; --force replaces only an earlier GGUF export\n"
    )
    assert foreign.read_text() == "not a model"
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = run("--out", str(blocker / "m.gguf"))
    assert code == 2 and "cannot write" in err
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.gguf"), "--format", "gguf", "--dtype", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    assert (
        main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--format", "llama", "--dtype", "q8_0"])
        == 2
    )
    assert capsys.readouterr().err == (
        "axiom export: error: --dtype q8_0: --format llama writes float32 (f32) or bfloat16 (bf16); "
        "float16 (f16) and int8 (q8_0) are for --format gguf\n"
    )
    # no temporary files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder", "m.gguf", "notes.txt"]


def write_foreign_gguf(path, **fields) -> bytes:
    """A small GGUF file of another writer (`fields`: string metadata, e.g. a copied axiom.version); its bytes."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        w.add_string(key.replace("_", "."), value)
    w.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_force_replaces_only_a_gguf_file_that_axiom_wrote(ckpt, tmp_path, capsys):
    """--force used to replace any file that starts with GGUF: a model downloaded from the Hub, or one that
    llama-quantize made from ours. Axiom records itself (axiom.version) and the file's size among the first keys."""

    def export_to(out, *flags):
        code = main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", "gguf", "--dtype", "q8_0", *flags])
        return code, capsys.readouterr().err

    ours = tmp_path / "ours.gguf"
    assert export_to(ours)[0] == 0
    with open(ours, "rb") as f:
        fields = leading_fields(f)
    assert fields["axiom.version"][1] == __version__ and fields["axiom.file_size"][1] == ours.stat().st_size
    renamed = tmp_path / "renamed.gguf"
    ours.rename(renamed)
    assert export_to(renamed, "--force")[0] == 0  # the record is in the file: renaming keeps it ours
    assert renamed.stat().st_mode & 0o777 == file_mode()  # the umask's, as every file we write
    downloaded = tmp_path / "downloaded.gguf"
    quantized = tmp_path / "quantized.gguf"  # metadata copied from ours, tensors rewritten: another size
    before = {downloaded: write_foreign_gguf(downloaded), quantized: write_foreign_gguf(quantized, axiom_version="0")}
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)  # opening it to read the magic would wait for a writer forever
    why = {
        downloaded: "is a GGUF file without axiom's record (no axiom.version key: another program's, or an older "
        "axiom's)",
        quantized: "is a GGUF file changed since axiom wrote it (its size is not the one recorded in it)",
        fifo: "is a FIFO, not a GGUF file",
    }
    for out, reason in why.items():
        assert export_to(out, "--force") == (
            2,
            f"axiom export: error: --out {out} {reason}; --force replaces only an earlier GGUF export\n",
        )
    assert all(path.read_bytes() == content for path, content in before.items())
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(renamed.read_bytes() + b"appended")
    code, err = export_to(changed, "--force")
    assert code == 2 and "is a GGUF file changed since axiom wrote it (its size is not the one recorded" in err
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["renamed.gguf", "changed.gguf", *(p.name for p in why)])  # and no temporary file


def test_a_gguf_file_written_while_we_waited_for_the_lock_is_checked_again(ckpt, tmp_path, monkeypatch, capsys):
    """Another program writes --out between the first check and the lock: the check under the lock refuses it."""
    import axiom.interop.export as export_mod

    out = tmp_path / "m.gguf"
    real_lock = export_mod.output_lock

    @contextlib.contextmanager
    def written_meanwhile(path, command):
        write_foreign_gguf(out)
        with real_lock(path, command):
            yield

    monkeypatch.setattr(export_mod, "output_lock", written_meanwhile)
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", "gguf", "--force"]) == 2
    assert "is a GGUF file without axiom's record" in capsys.readouterr().err
    assert out.read_bytes() == write_foreign_gguf(tmp_path / "same.gguf")


def test_read_only_file_system_fails_in_one_line(ckpt, tmp_path, monkeypatch):
    """As root (CI) no directory is read-only to us: the writer's open fails as on a read-only mount instead."""

    def refuse(self, path=None):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(gguf.GGUFWriter, "write_header_to_file", refuse)
    with pytest.raises(AxiomError, match=r"m.gguf: cannot write \(Read-only file system\)$"):
        export(ckpt, tmp_path / "m.gguf", "gguf")
    assert list(tmp_path.iterdir()) == []


def test_read_only_directory_fails_in_one_line(ckpt, tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o555)
    try:
        if os.access(target, os.W_OK):
            pytest.skip("running as root: a read-only directory is writable")
        with pytest.raises(AxiomError, match=r"ro/m.gguf: cannot write \(Permission denied\)"):
            export(ckpt, target / "m.gguf", "gguf")
        assert list(target.iterdir()) == []
    finally:
        target.chmod(0o755)


def test_small_vocabulary_is_refused(tmp_path):
    small = dataclasses.replace(FULL, vocab_size=512)
    (tmp_path / "ckpt").mkdir()
    save_model(Axiom(small), Config(small, TrainConfig()), tmp_path / "ckpt")
    with pytest.raises(AxiomError, match="vocab_size is 512, smaller than cl100k_base's 100,277"):
        export(tmp_path / "ckpt", tmp_path / "m.gguf", "gguf")
    assert not (tmp_path / "m.gguf").exists()
