"""`axiom export` / `axiom import` against Hugging Face transformers: parity, round trips, tokenizer, bad input.

Offline and on CPU. Two checkpoints: a random model with cl100k_base's full vocabulary (tokenizer, generate and
eval paths) and a micro model trained in-test on a small vocabulary (parity on a model whose logits mean
something). Exports are shared through a module-scoped cache.
"""

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_model
from safetensors.torch import load_file, save_file

from axiom.cli import main
from axiom.config import Config, ModelConfig, TrainConfig
from axiom.errors import AxiomError
from axiom.files import MARKER
from axiom.infer.generate import generate
from axiom.interop.export import export
from axiom.interop.hf.card import find_eval_csv
from axiom.interop.hf.folder import hf_config
from axiom.interop.hf.names import from_llama, llama_names, to_llama
from axiom.interop.importer import import_hf
from axiom.model.checkpoint import load_model, read_meta
from axiom.model.transformer import Axiom, num_params
from axiom.text.tokenizer import EOS_ID, load_tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers", reason="the hf extra is needed: pip install 'axiom-lm[hf]'")

FULL = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_multiple_of=64, max_seq_len=128)
SMALL = ModelConfig(
    vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_multiple_of=64, max_seq_len=128
)
FORMATS = ["axiom", "llama"]
ARCH = {"axiom": "AxiomForCausalLM", "llama": "LlamaForCausalLM"}
FP32_ATOL = 1e-5
# bfloat16 exports (docs/interop.md): against Axiom run in bfloat16, within BF16_ATOL (measured 0 on CPU);
# against the float32 model, within BF16_REL of the largest logit magnitude (measured about 0.4%).
BF16_ATOL = 1e-2
BF16_REL = 0.02
EVAL_ROWS = [(10, 5.0), (20, 4.0), (30, 4.5)]  # (step, val_loss) in the trained run's eval.csv


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    (root / "random").mkdir()
    save_model(Axiom(FULL), Config(FULL, TrainConfig()), root / "random", step=0, tokens=0)

    # A micro model trained 40 steps with plain AdamW on a stream that repeats a fixed 64-token pattern.
    torch.manual_seed(0)
    model = Axiom(SMALL)
    pattern = torch.randperm(SMALL.vocab_size)[:64]
    stream = pattern.repeat(40)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        starts = torch.randint(0, len(stream) - 33, (8,))
        batch = torch.stack([stream[s : s + 33] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    run = root / "run"
    trained = run / "checkpoints" / "step_000040"
    trained.mkdir(parents=True)
    data = {"dir": "data/x", "sources": ["a.parquet"], "train_tokens": 9000, "val_tokens": 100, "train_docs": 90}
    data.update(val_docs=1, val_fraction=0.01, split_seed=7)
    save_model(model, Config(SMALL, TrainConfig()), trained, step=40, tokens=40 * 8 * 32, data=data)
    with (run / "eval.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "tokens", "train_loss", "val_loss", "val_ppl", "val_bpb"])
        for step, loss in EVAL_ROWS:
            w.writerow([step, step * 256, loss + 0.1, loss, math.exp(loss), loss / 3])
    return {"random": root / "random", "trained": trained, "pattern": pattern}


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
    cache = {}

    def get(kind: str, fmt: str, dtype: str = "float32"):
        if (kind, fmt, dtype) not in cache:
            out = tmp_path_factory.mktemp("hf") / f"{kind}-{fmt}-{dtype}"
            cache[kind, fmt, dtype] = export(ckpts[kind], out, fmt, dtype)
        return cache[kind, fmt, dtype]

    return get


def hf_load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()


def ours(path):
    return load_model(path)[0].eval()


def test_name_map_covers_llama_exactly():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = hf_config(Config(SMALL, TrainConfig()), "llama", "float32", {})
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "axiom", "torch_dtype")}
    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(**cfg))
    theirs = {k: v.shape for k, v in llama.state_dict().items() if k != "lm_head.weight"}
    state = {k: v for k, v in Axiom(SMALL).state_dict().items() if k != "lm_head.weight"}
    converted = to_llama(state, SMALL)
    assert {k: v.shape for k, v in converted.items()} == theirs
    back, missing = from_llama(converted, SMALL)
    assert missing == [] and back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert len(llama_names(SMALL)) == 2 + 6 * SMALL.n_layers
    assert llama_names(dataclasses.replace(SMALL, tie_embeddings=False))["lm_head.weight"] == ("lm_head.weight",)


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_folder_layout(fmt, exported):
    path = exported("random", fmt)
    files = {p.name for p in path.iterdir()}
    common = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    remote = {"configuration_axiom.py", "modeling_axiom.py"}
    assert files == common | {"README.md", MARKER} | (remote if fmt == "axiom" else set())
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [ARCH[fmt]] and config["model_type"] == fmt
    assert config["tie_word_embeddings"] is True and config["eos_token_id"] == EOS_ID
    if fmt == "axiom":
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_axiom.AxiomForCausalLM"
        assert config["auto_map"]["AutoConfig"] == "configuration_axiom.AxiomConfig"
    # the tied table is stored once, under the input-embedding name
    keys = load_file(path / "model.safetensors").keys()
    assert "lm_head.weight" not in keys
    assert ("embed.weight" if fmt == "axiom" else "model.embed_tokens.weight") in keys
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == EOS_ID
    for name in remote & files:  # remote code imports only torch and transformers (and its sibling file)
        imports = [ln for ln in (path / name).read_text().splitlines() if ln.startswith(("import ", "from "))]
        assert all(ln.split()[1].split(".")[0] in ("torch", "transformers", "") for ln in imports), imports

    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert (loaded.hidden_size, loaded.num_hidden_layers, loaded.num_key_value_heads) == (64, 2, 2)
    assert loaded.max_position_embeddings == 128 and loaded.eos_token_id == EOS_ID


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["random", "trained"])
def test_float32_logits_and_greedy_generation_match(kind, fmt, ckpts, exported):
    model, hf = ours(ckpts[kind]), hf_load(exported(kind, fmt))
    assert type(hf).__name__ == ARCH[fmt]
    x = torch.randint(0, model.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    if kind == "trained":  # windows of the training pattern, where the model is confident
        x = torch.stack([ckpts["pattern"].repeat(2)[s : s + 48] for s in (5, 30)])
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= FP32_ATOL

    prompts = [x[0, :6].tolist(), x[1, :3].tolist()]  # different lengths: left padding on both sides
    want = generate(model, prompts, 32, temperature=0, eos_id=EOS_ID)
    ids = torch.tensor([prompts[0], [0] * 3 + prompts[1]])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    with torch.no_grad():
        got = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    for row, expected in zip(got[:, 6:].tolist(), want, strict=True):
        assert row[: len(expected)] == expected
    assert len(want[0]) == 32


def test_remote_code_cache_continues_in_chunks_with_padding(exported):
    """Prefill in two chunks (cached keys plus several new tokens) with a left-padded row, as a server would."""
    hf = hf_load(exported("trained", "axiom"))
    x = torch.randint(0, SMALL.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    with torch.no_grad():
        full = hf(x, attention_mask=mask).logits
        first = hf(x[:, :25], attention_mask=mask[:, :25], use_cache=True)
        rest = hf(x[:, 25:], attention_mask=mask, cache=first.cache, use_cache=True).logits
        alone = hf(x[1:, 7:]).logits  # the padded row equals the same tokens without padding
    assert (rest - full[:, 25:]).abs().max() <= FP32_ATOL
    assert (full[1:, 7:] - alone).abs().max() <= FP32_ATOL

    # the transformers conventions tools rely on: hidden states, and the shifted mean loss from labels
    with torch.no_grad():
        out = hf(x, labels=x, output_hidden_states=True)
    assert len(out.hidden_states) == SMALL.n_layers + 1
    assert torch.allclose(hf.lm_head(out.hidden_states[-1]), out.logits)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert torch.allclose(out.loss, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bfloat16_export_within_documented_tolerance(fmt, ckpts, exported):
    path = exported("trained", fmt, "bfloat16")
    assert {t.dtype for t in load_file(path / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    model, hf = ours(ckpts["trained"]), hf_load(path, torch.bfloat16)
    x = torch.randint(0, SMALL.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs, ref32 = hf(x).logits.float(), model(x)
        ref16 = model.to(torch.bfloat16)(x).float()
    assert (theirs - ref16).abs().max() <= BF16_ATOL
    assert (theirs - ref32).abs().max() <= BF16_REL * ref32.abs().max()


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_pretrained_round_trip_still_matches(fmt, ckpts, exported, tmp_path):
    hf = hf_load(exported("trained", fmt))
    hf.save_pretrained(tmp_path / "again")
    if fmt == "axiom":  # the remote code travels with the weights
        assert (tmp_path / "again" / "modeling_axiom.py").is_file()
        assert "auto_map" in json.loads((tmp_path / "again" / "config.json").read_text())
    assert "lm_head.weight" not in load_file(tmp_path / "again" / "model.safetensors")
    again = hf_load(tmp_path / "again")
    x = torch.randint(0, SMALL.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        first, second, want = hf(x).logits, again(x).logits, ours(ckpts["trained"])(x)
    assert torch.equal(first, second)
    assert (second - want).abs().max() <= FP32_ATOL


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_import_export_is_lossless(fmt, ckpts, exported, tmp_path):
    first = exported("random", fmt)
    ckpt = import_hf(first, tmp_path / "ckpt")
    original, back = load_file(ckpts["random"] / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    meta, original_meta = read_meta(ckpt), read_meta(ckpts["random"])
    assert meta["model"] == original_meta["model"] and meta["train"] == original_meta["train"]
    assert meta["step"] == 0 and meta["imported_format"] == fmt

    second = export(ckpt, tmp_path / "again", fmt)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config_a, config_b = (json.loads((p / "config.json").read_text()) for p in (first, second))
    assert {k: v for k, v in config_a.items() if k != "axiom"} == {k: v for k, v in config_b.items() if k != "axiom"}
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_import_reads_card_names_with_tied_lm_head_stored(ckpts, tmp_path):
    """A hand-made folder: AxiomForCausalLM config without Axiom's own config, and lm_head.weight stored too."""
    model, cfg, _ = load_model(ckpts["trained"])
    src = tmp_path / "src"
    src.mkdir()
    config = hf_config(cfg, "axiom", "float32", {})
    del config["axiom"]
    (src / "config.json").write_text(json.dumps(config))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in state
    save_file(state, src / "model.safetensors")
    back, back_cfg, _ = load_model(import_hf(src, tmp_path / "ckpt"))
    assert back_cfg.model.ffn_dim == cfg.model.ffn_dim and back_cfg.model.head_dim == cfg.model.head_dim
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True))
    assert back.lm_head.weight is back.embed.weight

    state["lm_head.weight"] += 1.0
    save_file(state, src / "model.safetensors")
    with pytest.raises(AxiomError, match="lm_head.weight differs from embed.weight"):
        import_hf(src, tmp_path / "ckpt2")


def test_untied_model_and_sharded_llama_folder(tmp_path):
    untied = dataclasses.replace(SMALL, tie_embeddings=False)
    torch.manual_seed(7)
    model = Axiom(untied).eval()
    (tmp_path / "ckpt").mkdir()
    save_model(model, Config(untied, TrainConfig()), tmp_path / "ckpt", step=1)
    x = torch.randint(0, untied.vocab_size, (1, 24), generator=torch.Generator().manual_seed(8))
    for fmt in FORMATS:
        path = export(tmp_path / "ckpt", tmp_path / fmt, fmt)
        assert "lm_head.weight" in load_file(path / "model.safetensors")
        with torch.no_grad():
            assert (hf_load(path)(x).logits - model(x)).abs().max() <= FP32_ATOL

    # split the Llama weights into two shards with an index, as large checkpoints are published
    state = load_file(tmp_path / "llama" / "model.safetensors")
    (tmp_path / "llama" / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, tmp_path / "llama" / shard)
        weight_map |= dict.fromkeys(part, shard)
    (tmp_path / "llama" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    back, back_cfg, _ = load_model(import_hf(tmp_path / "llama", tmp_path / "imported"))
    assert not back_cfg.model.tie_embeddings and back.lm_head.weight is not back.embed.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True))


TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 'quoted', isn't it? I'll, you've, we're.",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "3.14159 2718281828 -42 1e10 0x1F 100,000.00 1/2 12:30",
    "a  b   c    d\t\te\n\n\n  \n f      \r\n g \u00a0h  ",
    "Привет, мир! 你好，世界。こんにちは 안녕하세요 مرحبا بالعالم שלום Ελληνικά",
    "emoji 🎉🚀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 and e\u0301 combining",
    "",
    " leading space and trailing space ",
]


def test_tokenizer_matches_tiktoken(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported("random", "llama"))  # the same files in both formats
    enc = load_tokenizer()
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == EOS_ID
    g = torch.Generator().manual_seed(0)
    alphabet = "aZ9 \t\n.,'!é中😀ß-_()"
    fuzz = ["".join(alphabet[i] for i in torch.randint(0, len(alphabet), (40,), generator=g)) for _ in range(50)]
    for text in TEXTS + fuzz:
        ids = enc.encode_ordinary(text)
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == text
    mixed = "one<|endoftext|>two"  # special tokens in text map to their ids, as tiktoken's allowed_special
    assert tok(mixed)["input_ids"] == enc.encode(mixed, allowed_special="all")


def test_model_card_reports_config_and_eval_csv(exported):
    card = (exported("trained", "axiom") / "README.md").read_text()
    assert f"{num_params(SMALL):,}" in card
    assert "| layers | 2 |" in card and "| attention heads / KV heads | 4 / 2 (grouped-query) |" in card
    assert f"| best | 20 | 4.0000 | {math.exp(4.0):.2f} |" in card
    assert f"| final | 30 | 4.5000 | {math.exp(4.5):.2f} |" in card
    assert "| optimizer steps done | 40 |" in card and "trust_remote_code=True" in card
    assert "Intended uses and limitations" in card
    assert "9,000 train tokens (90 documents) and 100 validation tokens (1 documents) prepared from `a.parquet`" in card
    assert "`val_fraction=0.01`, `split_seed=7`" in card
    llama_card = (exported("random", "llama") / "README.md").read_text()
    assert "No eval.csv was found" in llama_card and "trust_remote_code" not in llama_card


@pytest.mark.parametrize(
    ("shape", "attention", "vocabulary"),
    [
        (dict(n_kv_heads=4), "4 / 4 (multi-head)", "100,277 (tiktoken cl100k_base, EOS <\\|endoftext\\|> = 100257) |"),
        (dict(n_kv_heads=1, vocab_size=100_352), "4 / 1 (multi-query)", "100,352 (tiktoken cl100k_base, EOS"),
        (dict(vocab_size=512), "4 / 2 (grouped-query)", "512 (the first 512 ids of tiktoken cl100k_base"),
    ],
    ids=["mha", "mqa-padded-vocab", "gqa-test-vocab"],
)
def test_model_card_names_the_attention_and_vocabulary_of_the_shape(shape, attention, vocabulary):
    """A card said "grouped-query" of every model, and "cl100k_base, EOS = 100257" of any vocabulary."""
    from axiom.interop.hf.card import model_card

    m = dataclasses.replace(FULL, **shape)
    card = model_card(Config(m, TrainConfig()), {}, "llama", "float32", None, name="x")
    kind = attention.split("(")[1].rstrip(")")
    assert f"| attention heads / KV heads | {attention} |" in card and f"RoPE, {kind} attention, SwiGLU" in card
    assert f"| vocabulary | {vocabulary}" in card
    assert ("75 more rows, unused" in card) == (m.vocab_size == 100_352)
    assert ("100257" in card) == (m.vocab_size > EOS_ID)


def split_shards(folder: Path, twice: str) -> None:
    """model.safetensors as two shards and their index, the tensor `twice` stored in both."""
    state = load_file(folder / "model.safetensors")
    names = sorted(state)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({k: state[k] for k in {*first, twice}}, folder / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in {*second, twice}}, folder / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 if k in first else 2}-of-00002.safetensors" for k in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model.safetensors").unlink()


def test_import_keeps_only_a_checkpoints_record_from_the_axiom_entry(exported, tmp_path):
    """Keys named like save_weights' parameters (directory, cfg) were passed on to it: a TypeError traceback."""
    src = tmp_path / "src"
    shutil.copytree(exported("trained", "llama"), src)
    config = json.loads((src / "config.json").read_text())
    config["axiom"] |= {"directory": "/elsewhere", "cfg": 1, "anything": [1]}
    (src / "config.json").write_text(json.dumps(config))
    import_hf(src, tmp_path / "ckpt")
    meta = read_meta(tmp_path / "ckpt")
    assert not meta.keys() & {"directory", "cfg", "anything"} and meta["step"] == config["axiom"]["step"]


def test_import_rejects_bad_folders_with_clear_messages(exported, tmp_path):
    src = exported("trained", "llama")

    def case(name, mutate):
        d = tmp_path / name
        shutil.copytree(src, d)
        mutate(d)
        return d

    def edit_config(**changes):
        def mutate(d):
            config = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**config, **changes}))

        return mutate

    def edit_weights(change):
        def mutate(d):
            state = load_file(d / "model.safetensors")
            change(state)
            save_file(state, d / "model.safetensors")

        return mutate

    k_proj = "model.layers.0.self_attn.k_proj.weight"
    cases = {
        "missing-dir": (lambda d: shutil.rmtree(d), "is not a directory"),
        "no-config": (lambda d: (d / "config.json").unlink(), r"config.json not found"),
        "no-weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
        "bad-json": (lambda d: (d / "config.json").write_text("{"), "config.json: not valid JSON"),
        "gpt2": (
            edit_config(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
            r"unknown architecture \['GPT2LMHeadModel'\] \(model_type 'gpt2'\)",
        ),
        "bias": (edit_config(attention_bias=True), "attention_bias True is not supported"),
        "shape": (
            edit_weights(lambda s: s.update({k_proj: s[k_proj][:8].clone()})),
            rf"{k_proj} has shape \(8, 64\) but config.json implies \(32, 64\)",
        ),
        "missing-tensor": (edit_weights(lambda s: s.pop("model.norm.weight")), r"missing \[model.norm.weight\]"),
        "extra-tensor": (
            edit_weights(lambda s: s.update({"model.extra.weight": torch.zeros(2)})),
            r"unexpected \[model.extra.weight\]",
        ),
        "config-vs-axiom": (edit_config(intermediate_size=256), "axiom.model gives ffn_dim=192 but"),
        "rope-not-object": (edit_config(rope_parameters=[1, 2]), "field 'rope_parameters' must be an object"),
        "rope-scaled": (  # the whole dictionary was printed, past 200 characters for llama3's
            edit_config(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}),
            r"config.json: rope_parameters.rope_type 'llama3' is not supported by Axiom-Dense$",
        ),
        "tie-string": (  # bool("false") is True: imported as tied
            edit_config(tie_word_embeddings="false"),
            "tie_word_embeddings is 'false', expected true or false",
        ),
        "head-dim-string": (edit_config(head_dim="16"), "head_dim is '16', expected an integer"),
        "record-type": (
            lambda d: edit_config(axiom={**json.loads((d / "config.json").read_text())["axiom"], "step": "x"})(d),
            "axiom.step is 'x', not what a checkpoint records",
        ),
        "shards-overlap": (  # the norm in both shards: the last file read won, whatever weight_map said
            lambda d: split_shards(d, twice="model.norm.weight"),
            "model.norm.weight is in another shard too",
        ),
        "int8-weights": (  # imported as nonsense floats, before: integers are no weights
            edit_weights(lambda s: s.update({k_proj: s[k_proj].to(torch.int8)})),
            rf"{k_proj} holds int8; weights are float32, bfloat16, float16, float64",
        ),
        "float8-weights": (  # a NotImplementedError traceback (isfinite), before
            edit_weights(lambda s: s.update({k_proj: s[k_proj].to(torch.float8_e4m3fn)})),
            rf"{k_proj} holds float8_e4m3fn; weights are",
        ),
        "bool-weights": (edit_weights(lambda s: s.update({k_proj: s[k_proj] > 0})), rf"{k_proj} holds bool; weights"),
        "complex-weights": (
            edit_weights(lambda s: s.update({k_proj: s[k_proj].to(torch.complex64)})),
            rf"{k_proj} holds complex64; weights are",
        ),
    }
    for name, (mutate, message) in cases.items():
        with pytest.raises(AxiomError, match=message):
            import_hf(case(name, mutate), tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_export_refuses_non_empty_out_unless_forced(ckpts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AxiomError, match="not empty; choose another --out"):
        export(ckpts["trained"], out, "llama")
    with pytest.raises(AxiomError, match="--force replaces only a folder written by axiom export"):
        export(ckpts["trained"], out, "llama", force=True)  # a folder of the user's: never replaced
    assert (out / "keep.txt").read_text() == "mine"
    out2 = export(ckpts["trained"], tmp_path / "out2", "llama")
    with pytest.raises(AxiomError, match="not empty; pass --force"):
        export(ckpts["trained"], out2, "llama")
    # a failed forced export leaves the old folder alone
    with pytest.raises(AxiomError, match="no-such-ckpt no such file or directory"):
        export(tmp_path / "no-such-ckpt", out2, "llama", force=True)
    (out2 / "note.txt").write_text("added")
    with pytest.raises(AxiomError, match="also holds note.txt; it is left alone"):  # added since: never replaced
        export(ckpts["trained"], out2, "llama", force=True)
    assert (out2 / "note.txt").read_text() == "added"
    (out2 / "note.txt").unlink()
    export(ckpts["trained"], out2, "llama", force=True)  # an earlier export: replaced
    assert (out2 / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out2"]


def test_model_card_takes_the_best_finite_loss_and_one_line_for_an_unreadable_eval_csv(ckpts, tmp_path, capsys):
    """A diverged evaluation (NaN) is no one's best; an eval.csv that is not UTF-8 text stops the export in one line
    (both were a "best: nan" row and a UnicodeDecodeError traceback)."""
    nan_first = tmp_path / "nan.csv"
    nan_first.write_text("step,tokens,train_loss,val_loss,val_ppl,val_bpb\n5,100,6.1,nan,nan,nan\n10,200,5.1,5.0,,\n")
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(ckpts["trained"]), "--out", str(out), "--eval-csv", str(nan_first)]) == 0
    card = (out / "README.md").read_text()
    assert f"| best | 10 | 5.0000 | {math.exp(5.0):.2f} |" in card and "nan" not in card
    garbled = tmp_path / "garbled.csv"
    garbled.write_bytes(b"step,val_loss\n\xff\xfe,1\n")
    args = ["export", "--ckpt", str(ckpts["trained"]), "--out", str(tmp_path / "hf2"), "--eval-csv", str(garbled)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{garbled}: not a CSV file of UTF-8 text" in err
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("fmt", ["axiom", "llama", "gguf"])
def test_export_without_the_hf_extra_is_one_line(ckpts, tmp_path, capsys, monkeypatch, fmt):
    """A folder export without transformers ended in PackageNotFoundError's traceback."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # find_spec and import now find nothing
    out = tmp_path / "out"
    assert main(["export", "--ckpt", str(ckpts["trained"]), "--out", str(out), "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"axiom export: error: --format {fmt} needs transformers, which is not installed: pip install 'axiom-lm[hf]'\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_card_reads_the_eval_csv_of_the_checkpoints_own_run(tmp_path, monkeypatch):
    """`--ckpt best` from inside RUN/checkpoints found no eval.csv, and a standalone checkpoint took an unrelated
    eval.csv two folders up."""
    run = tmp_path / "run"
    (run / "checkpoints" / "best").mkdir(parents=True)
    (run / "eval.csv").write_text("step,val_loss\n")
    monkeypatch.chdir(run / "checkpoints")
    assert find_eval_csv(Path("best")) == run.resolve() / "eval.csv"
    standalone = tmp_path / "w" / "standalone" / "ck"
    standalone.mkdir(parents=True)
    (tmp_path / "w" / "eval.csv").write_text("step,val_loss\n")
    assert find_eval_csv(standalone) is None
    (standalone / "eval.csv").write_text("step,val_loss\n")
    assert find_eval_csv(standalone) == standalone / "eval.csv"


def test_an_output_that_is_the_current_folder_is_one_line(ckpts, tmp_path, capsys, monkeypatch):
    """export and import write a new folder in place of --out: `.` (the current folder) or `..` is refused in one
    line (it was a ValueError traceback)."""
    (work := tmp_path / "empty").mkdir()
    monkeypatch.chdir(work)
    hf = tmp_path / "hf"
    export(ckpts["trained"], hf, "llama")
    for out in (".", "..", str(work)):
        for args in (["export", "--ckpt", str(ckpts["trained"]), "--format", "llama"], ["import", "--hf", str(hf)]):
            assert main([*args, "--out", out]) == 2
            err = capsys.readouterr().err
            whole = (
                f"--out {out}: the current folder or one above it; axiom {args[0]} writes its output as a new folder"
            )
            assert err.count("\n") == 1 and whole in err and "name it, e.g. --out ./model" in err
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "hf"]


def test_an_output_that_is_a_mount_point_is_one_line_before_any_work(ckpts, tmp_path, capsys, monkeypatch):
    """An empty volume root (docker's --out /output) passed every check, the whole export was written, then renaming
    the mount point failed: an OSError (EBUSY) traceback."""
    volume = tmp_path / "volume"
    volume.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: os.fspath(path) == str(volume) or real_ismount(path))
    hf = tmp_path / "hf"
    export(ckpts["trained"], hf, "llama")
    for args in (["export", "--ckpt", str(ckpts["trained"])], ["import", "--hf", str(hf)]):
        assert main([*args, "--out", str(volume)]) == 2
        err = capsys.readouterr().err
        assert (
            err.count("\n") == 1 and f"--out {volume} is a mount point;" in err and f"--out {volume / 'model'}" in err
        )
    assert list(volume.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "volume"]


def test_cli_export_import_and_one_line_errors(ckpts, tmp_path, capsys, caplog):
    hf, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    assert main(["export", "--ckpt", str(ckpts["trained"]), "--out", hf, "--format", "llama"]) == 0
    assert main(["import", "--hf", hf, "--out", ckpt, "--set", "lr_max=1e-4"]) == 0
    assert read_meta(ckpt)["train"]["lr_max"] == 1e-4
    # a model of 512 ids was trained with another tokenizer than the one axiom's commands use
    assert f"notice: {hf} has 512 token ids where cl100k_base has 100,277: it was trained with another" in caplog.text
    caplog.clear()
    assert main(["export", "--ckpt", str(ckpts["random"]), "--out", str(tmp_path / "full"), "--format", "llama"]) == 0
    assert main(["import", "--hf", str(tmp_path / "full"), "--out", str(tmp_path / "full-ckpt")]) == 0
    assert "notice" not in caplog.text
    capsys.readouterr()
    assert main(["export", "--ckpt", str(ckpts["trained"]), "--out", hf]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty; pass --force" in err
    assert main(["import", "--hf", ckpt, "--out", str(tmp_path / "x")]) == 2  # an Axiom checkpoint, not HF
    assert "unknown architecture None" in capsys.readouterr().err
    assert main(["import", "--hf", hf, "--out", str(tmp_path / "y"), "--set", "d_model=128"]) == 2
    assert "training fields only" in capsys.readouterr().err


def test_imported_checkpoint_feeds_generate_eval_and_training(ckpts, exported, tmp_path, capsys):
    from data_helpers import write_dataset

    ckpt = import_hf(exported("random", "llama"), tmp_path / "ckpt")
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("Hello")

    data = tmp_path / "data"
    write_dataset(data, train=["some training text"] * 4, val=["The validation text, said twice. " * 40] * 2)
    results = []
    for path in (ckpts["random"], ckpt):
        args = ["eval", "--ckpt", str(path), "--data", str(data), "--eval-tokens", "256", "--batch-size", "2"]
        assert main([*args, "--device", "cpu", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["loss"] == results[1]["loss"] and math.isfinite(results[1]["loss"])

    # continued pretraining: a fresh optimizer on the imported weights lowers the loss
    model, _, _ = load_model(ckpt)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, FULL.vocab_size, (2, 17), generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(5):
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_lm_eval_harness_runs_on_export(ckpts, exported, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install 'axiom-lm[eval]'")
    pytest.importorskip("accelerate", reason="lm_eval --model hf needs accelerate: pip install 'axiom-lm[eval]'")
    path = exported("random", "axiom")
    docs = [
        {"question": "The sky is", "choices": ["blue", "green"], "answer": 0},
        {"question": "def add(a, b): return", "choices": ["a + b", "banana"], "answer": 0},
    ]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "axiom_tiny.yaml").write_text(
        "task: axiom_tiny\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args"]
    cmd += [f"pretrained={path},trust_remote_code=True,dtype=float32", "--tasks", "axiom_tiny"]
    cmd += ["--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "2", "--log_samples"]
    cmd += ["--output_path", str(tmp_path / "results")]
    # a bound for a hang only: beside four busy processes on the 2-core VM this took 138 s, most of it importing
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    samples = [
        json.loads(line)
        for f in (tmp_path / "results").rglob("samples_axiom_tiny_*.jsonl")
        for line in f.read_text().splitlines()
    ]
    assert len(samples) == len(docs)

    # the harness's log-likelihoods are our model's
    model, enc = ours(ckpts["random"]), load_tokenizer()
    for sample in samples:
        requests = [sample["arguments"][f"gen_args_{i}"] for i in range(len(sample["arguments"]))]
        for request, resp in zip(requests, sample["filtered_resps"], strict=True):
            # the harness's split: encode context + continuation whole, the context's tokens come first
            whole = enc.encode_ordinary(request["arg_0"] + request["arg_1"])
            context = enc.encode_ordinary(request["arg_0"])
            continuation = whole[len(context) :]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids)[0, :-1].double(), -1)
            want = sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))
            assert abs(float(resp[0]) - want) < 1e-3
