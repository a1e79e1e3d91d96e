import json
import re
from pathlib import Path

import pytest

from axiom.config import PRESETS, ModelConfig, TrainConfig, apply_overrides, get_config, read_config_file
from axiom.errors import AxiomError

REPO = Path(__file__).resolve().parent.parent


def test_card_config_derives_sizes_and_plan():
    cfg = get_config("axiom-380m")
    assert cfg.model.head_dim == 64
    assert cfg.model.ffn_dim == 2816  # 2.6667 * 1024 = 2730.7, rounded up to a multiple of 256
    assert cfg.train.tokens_per_step == 327_680
    assert cfg.train.steps == 24_414
    assert cfg.train.planned_tokens == 7_999_979_520


def test_every_preset_builds():
    for name in PRESETS:
        cfg = get_config(name)
        assert cfg.train.steps > 0 and cfg.model.ffn_dim % cfg.model.ffn_multiple_of == 0


def test_overrides_are_typed():
    cfg = get_config(
        "tiny", ["d_model=256", "lr_max=1e-3", "compile=true", "max_steps=7", "dtype=float32", "target_tokens=8e9"]
    )
    assert cfg.model.d_model == 256 and cfg.model.head_dim == 64
    assert cfg.train.lr_max == 1e-3 and cfg.train.compile is True and cfg.train.max_steps == 7
    assert cfg.train.target_tokens == 8_000_000_000 and cfg.train.steps == 7
    assert get_config("tiny", ["max_steps=none"]).train.max_steps is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("nope=1", "unknown field 'nope'; known fields: beta1, "),
        ("lr_maxx=1", r"unknown field 'lr_maxx'; did you mean lr_max\? known fields: beta1, "),
        ("steps=9", r"'steps'; a value derived from the fields, not one to set; did you mean max_steps\? known"),
        ("head_dim=8", r"'head_dim'; a value derived from the fields, not one to set; known fields: beta1, "),
        ("d_model", "expected NAME=VALUE"),
        ("n_layers=2.5", "expected int"),
        ("compile=maybe", "expected bool"),
        ("lr_max=fast", "expected float"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(AxiomError, match=message):
        get_config("tiny", [override])


def test_unknown_preset():
    with pytest.raises(AxiomError, match="unknown preset 'huge'.*axiom-380m"):
        get_config("huge")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=1000, n_heads=16), "d_model=1000 is not divisible by n_heads=16"),
        (dict(n_heads=16, n_kv_heads=5), "n_heads=16 is not a multiple of n_kv_heads=5"),
        (
            dict(d_model=48, n_heads=16, n_kv_heads=8),
            r"head_dim = d_model / n_heads = 48 / 16 = 3 must be even for RoPE; change",
        ),
        (dict(n_layers=0), "n_layers=0 must be positive"),
        (dict(dropout=1.0), "dropout=1.0"),
    ],
)
def test_impossible_model_shapes(kwargs, message):
    with pytest.raises(AxiomError, match=message):
        ModelConfig(**kwargs)


def test_impossible_train_settings():
    with pytest.raises(AxiomError, match="lr_min"):
        TrainConfig(lr_max=1e-4, lr_min=1e-3)
    with pytest.raises(AxiomError, match="less than one optimizer step"):
        TrainConfig(target_tokens=1000)
    with pytest.raises(AxiomError, match="optimizer='sgd'"):
        TrainConfig(optimizer="sgd")


def file_config(path, *overrides):
    """What `--config path --set ...` makes: the file's preset (else tiny), its values, then the overrides."""
    file = read_config_file(path)
    return apply_overrides(get_config(file.preset or "tiny"), list(overrides), file)


def test_config_file_tables_preset_and_set(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'preset = "small"\n[model]\nn_layers = 4\n[train]\nlr_max = 1\ntarget_tokens = 1e7\nmax_steps = 2\n'
    )
    cfg = file_config(path, "max_steps=7")
    assert cfg == get_config("small", ["n_layers=4", "lr_max=1.0", "target_tokens=10000000", "max_steps=7"])
    assert type(cfg.train.lr_max) is float and type(cfg.train.target_tokens) is int  # as --set types them
    (tmp_path / "empty.toml").write_text("")
    assert file_config(tmp_path / "empty.toml") == get_config("tiny")
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf[train]\nlr_max = 1e-3\n")  # as some editors save it
    assert file_config(tmp_path / "bom.toml") == get_config("tiny", ["lr_max=1e-3"])


def test_a_runs_config_json_is_a_config_file(tmp_path):
    """A run's or checkpoint's config.json: its model and train tables; step, tokens, data, ... are its record."""
    cfg = get_config("tiny", ["d_model=128", "lr_max=1e-3", "max_steps=5"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg.to_dict(), "step": 4, "tokens": 512, "data": {"dir": "d"}, "val_loss": 5.0}))
    assert file_config(path) == cfg


def test_the_sft_recipe_file_is_the_documented_recipe():
    """configs/sft.toml, shown verbatim in docs/training.md, is docs/finetuning.md's eight --set flags."""
    text = (REPO / "configs" / "sft.toml").read_text()
    assert f"```toml\n{text}```" in (REPO / "docs" / "training.md").read_text()
    recipe = (REPO / "docs" / "finetuning.md").read_text().split("axiom train --preset axiom-380m")[1]
    sets = re.findall(r"--set (\S+)", recipe.split("\naxiom")[0])
    assert len(sets) == 8 and file_config(REPO / "configs" / "sft.toml") == get_config("axiom-380m", sets)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[train]\nlr_maxx = 1e-3\n", r"x.toml: train.lr_maxx: unknown field 'lr_maxx'; did you mean lr_max\?"),
        ("[model]\nlr_max = 1e-3\n", "x.toml: model.lr_max: a field of \\[train\\], not \\[model\\]"),
        ("lr_max = 1e-3\n", "x.toml: lr_max at the top level; field values go in the \\[train\\] table"),
        ("[trian]\nlr_max = 1e-3\n", "x.toml: unknown key 'trian'; did you mean train\\?"),
        ('preset = "huge"\n', "x.toml: preset = 'huge': unknown preset; choose one of: axiom-380m"),
        ('[train]\nlr_max = "3e-5"\n', "x.toml: train.lr_max = '3e-5': expected float$"),
        ("[train]\nfsdp = 1\n", "x.toml: train.fsdp = 1: expected bool$"),
        ("[train]\ncompile = 1\n", "x.toml: train.compile = 1: expected bool or auto$"),
        ('[train]\nmicro_batch_size = "big"\n', "x.toml: train.micro_batch_size = 'big': expected int or auto$"),
        ("[train]\nmax_steps = 2.5\n", "x.toml: train.max_steps = 2.5: expected int or null$"),
        ("[train]\nbeta1 = 1.5\n", r"x.toml: train config: beta1=1.5 must be in \[0, 1\)"),
        ("train = 3\n", "x.toml: train = 3: expected a table of field values"),
        ("[train]\nlr_max == 1\n", r"x.toml: not valid TOML \(.*line 2"),
    ],
)
def test_config_file_mistakes_are_one_line_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "x.toml"
    path.write_text(text)
    with pytest.raises(AxiomError, match=message):
        file_config(path)


def test_what_is_not_a_config_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(get_config("tiny").to_dict()))
    with pytest.raises(AxiomError, match=f"--config {run}: a directory; {run / 'config.json'} is one$"):
        read_config_file(run)
    with pytest.raises(AxiomError, match="no such file or directory; pass a .toml file"):
        read_config_file(tmp_path / "missing.toml")
    (tmp_path / "x.yaml").write_text("lr_max: 1\n")
    with pytest.raises(AxiomError, match="x.yaml: not a .toml or .json file"):
        read_config_file(tmp_path / "x.yaml")
    (tmp_path / "hf.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    with pytest.raises(AxiomError, match="hf.json: a Hugging Face model config, not an Axiom one"):
        read_config_file(tmp_path / "hf.json")
    (tmp_path / "other.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(AxiomError, match="other.json: no model or train table"):
        read_config_file(tmp_path / "other.json")


def test_the_size_bounds_take_the_largest_real_models():
    """Llama 3.1 405B's shape, a 1,048,576-token context (Gradient's Llama-3 1048k imported before the bounds came)
    and Gemma's 256k-id vocabulary are models; ten times those sizes are not."""
    ModelConfig(d_model=16_384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_multiplier=3.25, max_seq_len=131_072)
    ModelConfig(d_model=4096, n_heads=32, max_seq_len=1_048_576, vocab_size=262_144)
    for field, value in [("max_seq_len", 10_485_760), ("n_layers", 1260), ("vocab_size", 2_621_440)]:
        with pytest.raises(AxiomError, match=f"model config: {field}={value} is more than"):
            ModelConfig(**{field: value})
