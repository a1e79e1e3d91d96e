import pytest

from axiom.config import PRESETS, ModelConfig, TrainConfig, get_config
from axiom.errors import AxiomError


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
        (dict(d_model=48, n_heads=16, n_kv_heads=8), "head_dim=3 must be even"),
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
