"""Model and training configuration: two dataclasses, named presets, configuration files (TOML, or a run's
config.json) and `--set NAME=VALUE` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from axiom.dtypes import TRAIN_DTYPES
from axiom.errors import AxiomError
from axiom.files import describe_missing, read_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

AUTO = "auto"
Auto = Literal["auto"]  # a setting the training plan chooses for the device (axiom/train/plan.py)
# TrainConfig.loss_kernel: chunked is ours, on every device; the others are fused Triton kernels of other projects
# (axiom/model/fused_loss.py)
LOSS_KERNELS = ("chunked", "liger", "cce")


# Upper bounds of the model's sizes, past the largest models trained (d_model 16,384 and 126 layers for a 405B
# model, Llama-architecture models of 1,048,576-token contexts, 256k-id vocabularies): a config.json from elsewhere
# that asks for more is refused before anything is allocated (a max_seq_len of 10**9 filled the memory with RoPE
# tables, 10**6 layers took minutes to build on the meta device).
MAX_SIZES = {
    "vocab_size": 2**21,
    "d_model": 2**16,
    "n_layers": 2**10,
    "n_heads": 2**12,
    "n_kv_heads": 2**12,
    "ffn_multiple_of": 2**16,
    "max_seq_len": 2**21,
}
MAX_FFN_DIM = 2**20


@dataclass
class ModelConfig:
    vocab_size: int = 100_277  # cl100k_base, EOS 100257 included
    d_model: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    n_kv_heads: int = 8  # grouped-query attention: each KV head serves n_heads // n_kv_heads query heads
    ffn_multiplier: float = 2.6667  # SwiGLU width = ffn_multiplier * d_model, rounded up to ffn_multiple_of
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    max_seq_len: int = 1024
    tie_embeddings: bool = True  # lm_head.weight is embed.weight
    dropout: float = 0.0
    head_dim: int = field(init=False)
    ffn_dim: int = field(init=False)

    def __post_init__(self) -> None:
        _check_types(self, "model config")
        for name, most in MAX_SIZES.items():
            if getattr(self, name) <= 0:
                raise AxiomError(f"model config: {name}={getattr(self, name)} must be positive")
            if getattr(self, name) > most:
                raise AxiomError(f"model config: {name}={_shown(getattr(self, name))} is more than {most:,}")
        if self.d_model % self.n_heads:
            raise AxiomError(f"model config: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise AxiomError(f"model config: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        self.head_dim = self.d_model // self.n_heads
        if self.head_dim % 2:
            raise AxiomError(
                f"model config: head_dim = d_model / n_heads = {self.d_model} / {self.n_heads} = {self.head_dim} must "
                "be even for RoPE; change d_model or n_heads"
            )
        for name in ("ffn_multiplier", "norm_eps", "rope_theta"):
            if not 0 < getattr(self, name) < math.inf:
                raise AxiomError(f"model config: {name}={getattr(self, name)} must be a positive finite number")
        if not 0.0 <= self.dropout < 1.0:
            raise AxiomError(f"model config: dropout={self.dropout} must be in [0, 1)")
        m = self.ffn_multiple_of
        if self.ffn_multiplier * self.d_model > MAX_FFN_DIM:  # before the rounding, which overflows at inf
            raise AxiomError(
                f"model config: ffn_multiplier={self.ffn_multiplier} x d_model={self.d_model} is more than "
                f"{MAX_FFN_DIM:,} (the SwiGLU width)"
            )
        self.ffn_dim = m * math.ceil(self.ffn_multiplier * self.d_model / m)


@dataclass
class TrainConfig:
    # sequences per forward/backward; auto: the largest the device takes, the step's sequences regrouped
    micro_batch_size: int | Auto = 1
    seq_len: int = 1024  # tokens per sequence
    grad_accum_steps: int = 320  # micro-batches per optimizer step (summed over all ranks); of 1 sequence while auto
    target_tokens: int = 8_000_000_000  # steps = target_tokens // tokens_per_step
    max_steps: int | None = None  # optional cap on optimizer steps
    warmup_steps: int = 2000  # linear warmup from 0 to lr_max
    decay_fraction: float = 0.2  # final share of steps over which the LR follows a cosine to lr_min
    lr_max: float = 3e-4
    lr_min: float = 1e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 500  # optimizer steps between evaluations
    eval_tokens: int = 1_048_576  # validation tokens per evaluation
    checkpoint_interval: int = 1000  # optimizer steps between checkpoints
    seed: int = 1337  # Python, NumPy and PyTorch
    dtype: str = "bfloat16"  # autocast dtype on GPU: bfloat16 | float16 | float32
    compile: bool | Auto = False  # torch.compile the model; auto: on CUDA
    # recompute each block's activations in backward; auto: only where the micro-batch would otherwise stay small
    gradient_checkpointing: bool | Auto = True
    optimizer: str = "adamw8bit"  # adamw8bit (bitsandbytes, falls back to adamw) | adamw
    # the output layer's loss: chunked (ours) | liger | cce (fused Triton kernels, CUDA, the kernels extra); auto:
    # the plan's choice, ours until a GPU measures a fused kernel faster (axiom.train.plan.AUTO_LOSS_KERNEL)
    loss_kernel: str = "chunked"
    val_fraction: float = 0.001  # share of documents hashed into the validation split
    split_seed: int = 1337  # salt of the split hash
    keep_checkpoints: int = 3  # newest step checkpoints kept (the best is kept apart, in checkpoints/best)
    max_bad_steps: int = 10  # consecutive skipped steps (non-finite, or a loss spike) before a rollback or a stop
    spike_factor: float = 2.0  # a step whose loss exceeds this multiple of the running average is skipped; 0: off
    max_rollbacks: int = 3  # rollbacks to the last good checkpoint before training stops; 0: stop at once
    rollback_lr_factor: float = 0.5  # the LR is multiplied by this after each rollback ...
    rollback_lr_steps: int = 1000  # ... for this many steps from the checkpoint rolled back to
    log_interval: int = 10  # optimizer steps between lines in train.log / train.csv
    fsdp: bool = False  # under torchrun: shard weights, grads and optimizer state with FSDP2 instead of DDP
    eval_tasks: str = ""  # comma-separated multiple-choice JSONL files scored at every evaluation (docs/evaluation.md)
    doc_masking: bool | None = None  # attention only within each document of a window; None: on for chat data only

    def __post_init__(self) -> None:
        """Each field's own range; `check_plan` adds the checks between fields for a run being started."""
        _check_types(self, "train config")
        for name in ("micro_batch_size", "grad_accum_steps", "target_tokens", "eval_tokens"):
            value = getattr(self, name)
            _need(name, value, value == AUTO or value > 0, "must be positive")
        _need("seq_len", self.seq_len, self.seq_len >= 2, "must be at least 2 (one token of context and a target)")
        if self.max_steps is not None:
            _need("max_steps", self.max_steps, self.max_steps > 0, "must be positive or None")
        _need("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "must be 0 or more")
        _need("decay_fraction", self.decay_fraction, 0.0 <= self.decay_fraction <= 1.0, "must be in [0, 1]")
        _need("lr_max", self.lr_max, 0.0 < self.lr_max < math.inf, "must be a positive finite number")
        _need("lr_min", self.lr_min, 0.0 <= self.lr_min <= self.lr_max, f"must be in [0, lr_max={self.lr_max}]")
        _need("weight_decay", self.weight_decay, 0.0 <= self.weight_decay < math.inf, "must be 0 or more (finite)")
        for name in ("beta1", "beta2"):
            _need(name, getattr(self, name), 0.0 <= getattr(self, name) < 1.0, "must be in [0, 1)")
        _need("grad_clip", self.grad_clip, 0.0 <= self.grad_clip < math.inf, "must be 0 (off) or a positive number")
        _need("val_fraction", self.val_fraction, 0.0 < self.val_fraction < 1.0, "must be in (0, 1)")
        _need("seed", self.seed, 0 <= self.seed < 2**32, "must be in [0, 2**32) (NumPy's seed range)")
        if self.dtype not in TRAIN_DTYPES:
            choices = f"{', '.join(TRAIN_DTYPES[:-1])} or {TRAIN_DTYPES[-1]}"
            raise AxiomError(f"train config: dtype={self.dtype!r} must be {choices}")
        if self.optimizer not in ("adamw8bit", "adamw"):
            raise AxiomError(f"train config: optimizer={self.optimizer!r} must be adamw8bit or adamw")
        if self.loss_kernel not in (AUTO, *LOSS_KERNELS):
            raise AxiomError(
                f"train config: loss_kernel={self.loss_kernel!r} must be auto, {', '.join(LOSS_KERNELS[:-1])} or "
                f"{LOSS_KERNELS[-1]}"
            )
        if self.spike_factor != 0 and not self.spike_factor > 1:
            raise AxiomError(f"train config: spike_factor={self.spike_factor} must be 0 (off) or greater than 1")
        if not 0 < self.rollback_lr_factor <= 1 or self.max_rollbacks < 0 or self.rollback_lr_steps < 0:
            raise AxiomError(
                f"train config: need 0 < rollback_lr_factor <= 1 (got {self.rollback_lr_factor}), max_rollbacks >= 0 "
                f"(got {self.max_rollbacks}) and rollback_lr_steps >= 0 (got {self.rollback_lr_steps})"
            )
        for name in ("keep_checkpoints", "max_bad_steps", "log_interval", "eval_interval", "checkpoint_interval"):
            _need(name, getattr(self, name), getattr(self, name) > 0, "must be positive")
        names = self.task_files
        if "" in names or len(set(names)) < len(names):
            raise AxiomError(
                f"train config: eval_tasks={self.eval_tasks!r} must be distinct task file paths separated by commas"
            )
        if self.steps == 0:
            raise AxiomError(
                f"train config: target_tokens={self.target_tokens} is less than one optimizer step "
                f"({self.tokens_per_step} tokens)"
            )

    def check_plan(self) -> None:
        """Checks between fields of a run being configured (`--set` on train, info, import, ...). Stored configs are
        not held to them, so that older checkpoints still load, resume and export."""
        if self.eval_tokens < self.seq_len:
            raise AxiomError(
                f"train config: eval_tokens={self.eval_tokens} is less than one sequence (seq_len={self.seq_len}), "
                "so an evaluation would read nothing"
            )

    def notices(self) -> list[str]:
        """Settings that run but probably not as meant; printed when a configuration is made from --set. (A
        warmup longer than the run is a notice, not an error: short smoke runs of a preset do it on purpose.)"""
        notes = []
        if self.warmup_steps > self.steps:
            reached = self.steps / self.warmup_steps
            notes.append(
                f"warmup_steps={self.warmup_steps} is more than the run's {self.steps} steps: the LR only reaches "
                f"{reached:.0%} of lr_max (e.g. --set warmup_steps={max(self.steps // 10, 1)})"
            )
        return notes

    @property
    def task_files(self) -> list[str]:
        """The paths in eval_tasks (an empty one, from a stray comma, is refused when the config is made)."""
        return [p.strip() for p in self.eval_tasks.split(",")] if self.eval_tasks.strip() else []

    @property
    def sequences_per_step(self) -> int:
        """micro_batch_size x grad_accum_steps; an auto micro-batch counts 1 (grad_accum_steps then counts
        sequences, which the plan regroups into larger micro-batches: the step stays exactly this)."""
        return (1 if self.micro_batch_size == AUTO else self.micro_batch_size) * self.grad_accum_steps

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len

    @property
    def steps(self) -> int:
        steps = self.target_tokens // self.tokens_per_step
        return min(steps, self.max_steps) if self.max_steps is not None else steps

    @property
    def planned_tokens(self) -> int:
        return self.steps * self.tokens_per_step


def _check_types(obj, what: str) -> None:
    """Every init field holds its annotated type (an int is a float; a bool is not an int): a config.json with
    "d_model": "64" or "compile": "yes" fails here with the field's name, not later with a TypeError."""
    for name, allowed in _field_types(type(obj)).items():
        value = getattr(obj, name)
        ok = any(_holds(t, value, exact=False) for t in allowed)
        if not ok or (isinstance(value, bool) and bool not in allowed):
            raise AxiomError(f"{what}: {name}={_shown(value)} must be of type {_type_names(allowed)}")


def _shown(value: object) -> str:
    """A value for a message; an integer too long to read as its number of digits (str() refuses past 4,300)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<an integer of {int(value.bit_length() * math.log10(2)) + 1:,} digits>"
    return repr(value)


def _holds(t: Any, value: Any, exact: bool) -> bool:
    """Whether `value` is of the annotated type `t`: None for NoneType, one of a Literal's values, else an instance
    (`exact`: of that very type, as a file's values must be; else an int is a float too)."""
    if t is type(None):
        return value is None
    if typing.get_origin(t) is Literal:
        return isinstance(value, str) and value in typing.get_args(t)
    if exact:
        return type(value) is t
    return isinstance(value, (int, float) if t is float else t)


def _type_names(allowed: tuple[Any, ...]) -> str:
    """'int or auto', 'int or null': the types of a field for a message."""
    names = []
    for t in allowed:
        literal = typing.get_origin(t) is Literal
        names.append(" or ".join(typing.get_args(t)) if literal else "null" if t is type(None) else t.__name__)
    return " or ".join(names)


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Init field name -> the types its annotation allows (int | None -> (int, NoneType))."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) or (hints[f.name],) for f in dataclasses.fields(cls) if f.init}


def _need(name: str, value, ok: bool, what: str) -> None:
    """One AxiomError for a TrainConfig field outside its range (NaN fails every range)."""
    if not ok:
        raise AxiomError(f"train config: {name}={value} {what}")


@dataclass
class Config:
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"model": _init_fields(self.model), "train": _init_fields(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(ModelConfig(**d["model"]), TrainConfig(**d["train"]))

    @property
    def eval_seq_len(self) -> int:
        """The windows of an evaluation of the val split: the run's seq_len, within the model's context."""
        return min(self.train.seq_len, self.model.max_seq_len)

    def check_context(self) -> None:
        """A training sequence fits the model's context."""
        if self.train.seq_len > self.model.max_seq_len:
            raise AxiomError(
                f"train config: seq_len={self.train.seq_len} exceeds the model's max_seq_len={self.model.max_seq_len}; "
                "lower it with --set seq_len=N"
            )


def _axiom_380m() -> Config:
    # The card's recipe (327,680 tokens a step, its schedule, AdamW8bit, bf16). How a step is split into micro-batches,
    # activation checkpointing, compiling and the loss kernel are the device's business: the plan chooses them
    # (axiom/train/plan.py). The card's literal settings: --set micro_batch_size=1 --set gradient_checkpointing=true
    # --set compile=false.
    auto = dict(micro_batch_size=AUTO, gradient_checkpointing=AUTO, compile=AUTO, loss_kernel=AUTO)
    return Config(ModelConfig(), TrainConfig(**auto))


def _tiny() -> Config:
    # Trains visibly on 2 CPU cores in minutes (`make demo`; docs/training.md has its time and losses). The
    # vocabulary stays cl100k_base's, so the 100k-way output layer is most of the cost of a token: the model is
    # narrow, and small batches buy many updates from the ~160k tokens that fit in the time.
    return Config(
        ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_multiple_of=64, max_seq_len=256),
        TrainConfig(
            micro_batch_size=4,
            seq_len=128,
            grad_accum_steps=1,
            target_tokens=320 * 512,
            warmup_steps=20,
            lr_max=3e-3,
            lr_min=1e-4,
            eval_interval=40,
            eval_tokens=8192,
            checkpoint_interval=80,
            dtype="float32",
            gradient_checkpointing=False,
            optimizer="adamw",  # 8-bit state saves no memory worth having here, and its CPU step is slower
            val_fraction=0.02,
        ),
    )


def _small() -> Config:
    # The mid-size benchmark preset (`axiom bench`, docs/benchmarks.md): 32M parameters, 8 layers x 256 with
    # head_dim 64 like the card, so the blocks weigh more than in tiny; one step of 1,024 tokens takes seconds
    # on 2 CPU cores.
    return Config(
        ModelConfig(d_model=256, n_layers=8, n_heads=4, n_kv_heads=2, max_seq_len=512),
        TrainConfig(
            micro_batch_size=4,
            seq_len=256,
            grad_accum_steps=1,
            target_tokens=20_000_000,
            warmup_steps=200,
            lr_max=1e-3,
            lr_min=1e-4,
            eval_interval=500,
            eval_tokens=65_536,
            checkpoint_interval=1000,
            gradient_checkpointing=False,
            optimizer="adamw",
            val_fraction=0.02,
        ),
    )


PRESETS = {"axiom-380m": _axiom_380m, "tiny": _tiny, "small": _small}


def get_config(preset: str, overrides: list[str] | None = None) -> Config:
    """The named preset with `NAME=VALUE` overrides applied (names from ModelConfig or TrainConfig)."""
    if preset not in PRESETS:
        raise AxiomError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return apply_overrides(PRESETS[preset](), overrides)


def apply_overrides(cfg: Config, overrides: list[str] | None, file: ConfigFile | None = None) -> Config:
    """A new Config: `cfg` with a configuration file's values, then `NAME=VALUE` overrides, applied (names from
    ModelConfig or TrainConfig). The file on top of `cfg` must be a valid configuration by itself."""
    if file is not None:
        cfg = file.applied_to(cfg)
    model_kw = _init_fields(cfg.model)
    train_kw = _init_fields(cfg.train)
    for item in overrides or []:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep:
            raise AxiomError(f"--set {item!r}: expected NAME=VALUE")
        if name in model_kw:
            model_kw[name] = _parse(ModelConfig, name, raw)
        elif name in train_kw:
            train_kw[name] = _parse(TrainConfig, name, raw)
        else:
            raise AxiomError(f"--set {item!r}: {unknown_field(name, [*model_kw, *train_kw])}")
    new = Config(ModelConfig(**model_kw), TrainConfig(**train_kw))
    if overrides or file is not None:  # a configuration being made; a stored one (resume, import) ran as it is
        new.train.check_plan()
    return new


def unknown_field(name: str, known: list[str]) -> str:
    """Why `name` is refused: a derived value (head_dim, steps, ...), the close match first (difflib), then every
    known name."""
    derived = any(name in _derived(cls) for cls in (ModelConfig, TrainConfig))
    close = difflib.get_close_matches(name, known, n=1)
    why = "a value derived from the fields, not one to set; " if derived else ""
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown field {name!r}; {why}{hint}known fields: {', '.join(sorted(known))}"


@functools.cache
def _derived(cls: type) -> frozenset[str]:
    """The values of a config class that are computed, not given: fields outside __init__, and properties."""
    computed = {f.name for f in dataclasses.fields(cls) if not f.init}
    return frozenset(computed | {name for name, v in vars(cls).items() if isinstance(v, property)})


def changed_fields(old, new) -> list[str]:
    """'name old -> new' for each constructor argument that differs between two configs of one class."""
    before, after = _init_fields(old), _init_fields(new)
    return [f"{name} {before[name]!r} -> {after[name]!r}" for name in before if before[name] != after[name]]


def _init_fields(obj) -> dict:
    """The constructor arguments of a config dataclass (derived fields left out)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def _parse(cls: type, name: str, raw: str):
    """Convert a CLI string to the field's annotated type (int, float, bool, str, an optional of one, or one that
    also takes a word: auto)."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    words = [v for a in args if typing.get_origin(a) is Literal for v in typing.get_args(a)]  # e.g. "auto"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None) and typing.get_origin(a) is not Literal)
    raw = raw.strip()
    if optional and raw.lower() in ("none", "null", ""):
        return None
    if raw.lower() in words:
        return raw.lower()
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            try:
                return int(raw)  # exact, however large (8_000_000_000 too)
            except ValueError:
                value = float(raw)  # 8e9, 1e1, 8.0
            if not value.is_integer():
                raise ValueError
            return int(value)
        return hint(raw)
    except ValueError:
        raise AxiomError(f"--set {name}={raw}: expected {' or '.join([hint.__name__, *words])}") from None


# ---- configuration files: `axiom train --config FILE`


@dataclass(frozen=True)
class ConfigFile:
    """A configuration file: the preset it starts from (optional) and field values in a [model] and a [train]
    table, exactly as a run's config.json stores them. Values are typed; ranges are checked when applied."""

    path: Path
    preset: str | None
    model: dict[str, Any]
    train: dict[str, Any]

    def applied_to(self, cfg: Config) -> Config:
        """`cfg` with this file's values; one AxiomError naming the file when the result is not a valid config."""
        try:
            return Config(
                ModelConfig(**{**_init_fields(cfg.model), **self.model}),
                TrainConfig(**{**_init_fields(cfg.train), **self.train}),
            )
        except AxiomError as e:
            raise AxiomError(f"{self.path}: {e}") from None


TABLES = {"model": ModelConfig, "train": TrainConfig}


def is_hf_config(data: dict) -> bool:
    """Whether a parsed config.json is a Hugging Face model's (a Llama or an export's), not an Axiom run's."""
    return ("architectures" in data or "model_type" in data) and not data.keys() & TABLES.keys()


CONFIG_HINT = "pass a .toml file ([model] and [train] tables, docs/training.md) or a run's config.json"


def read_config_file(path: str | Path) -> ConfigFile:
    """A .toml file or a config.json written by axiom train (a run's or a checkpoint's: its other top-level keys,
    step, tokens, data, ..., are its record and are ignored). Every problem is one AxiomError naming the file and
    the key."""
    path = Path(path)
    if not path.is_file():
        inside = path / "config.json"
        hint = f"; {inside} is one" if path.is_dir() and inside.is_file() else f"; {CONFIG_HINT}"
        raise AxiomError(f"--config {path}: {describe_missing(path).removeprefix('is ')}{hint}")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        data = _read_toml(path)
    elif suffix == ".json":
        data = read_json(path, CONFIG_HINT)
    else:
        raise AxiomError(f"--config {path}: not a .toml or .json file; {CONFIG_HINT}")
    return _config_file(path, data, strict=suffix == ".toml")


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark some editors write
    except UnicodeDecodeError:
        raise AxiomError(f"{path}: not UTF-8 text, so not a TOML file; {CONFIG_HINT}") from None
    except (ValueError, RecursionError) as e:  # TOMLDecodeError; an int past 4,300 digits; nesting past the depth
        raise AxiomError(f"{path}: not valid TOML ({type(e).__name__}: {str(e)[:120]})") from None
    except OSError as e:
        raise AxiomError(f"{path}: cannot read ({e.strerror})") from None


def _config_file(path: Path, data: dict, strict: bool) -> ConfigFile:
    """Check the layout of a parsed file and type its values. `strict`: unknown top-level keys are errors (TOML);
    a JSON file's are the record of a run or checkpoint."""
    if is_hf_config(data):
        raise AxiomError(f"{path}: a Hugging Face model config, not an Axiom one; {CONFIG_HINT}")
    for key in data:
        table = next((t for t, cls in TABLES.items() if key in _field_types(cls)), None)
        if table is not None:
            raise AxiomError(f"{path}: {key} at the top level; field values go in the [{table}] table")
        if strict and key not in ("preset", *TABLES):
            close = difflib.get_close_matches(key, ["preset", *TABLES], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise AxiomError(f"{path}: unknown key {key!r}; {hint}a config file holds preset, [model] and [train]")
    preset = data.get("preset")
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise AxiomError(f"{path}: preset = {preset!r}: unknown preset; choose one of: {', '.join(PRESETS)}")
    if not strict and not data.keys() & TABLES.keys():
        raise AxiomError(f"{path}: no model or train table; {CONFIG_HINT}")
    tables = {name: _table(path, data, name) for name in TABLES}
    return ConfigFile(path, preset, tables["model"], tables["train"])


def _table(path: Path, data: dict, name: str) -> dict[str, Any]:
    """The typed values of table `name` ("model" or "train") of a parsed file."""
    values = data.get(name, {})
    if not isinstance(values, dict):
        raise AxiomError(f"{path}: {name} = {values!r}: expected a table of field values")
    cls, fields = TABLES[name], _field_types(TABLES[name])
    typed = {}
    for key, value in values.items():
        if key not in fields:
            other = next((t for t, c in TABLES.items() if key in _field_types(c)), None)
            what = f"a field of [{other}], not [{name}]" if other else unknown_field(key, list(fields))
            raise AxiomError(f"{path}: {name}.{key}: {what}")
        typed[key] = _file_value(cls, key, value, f"{path}: {name}.{key}")
    return typed


def _file_value(cls: type, name: str, value: Any, where: str) -> Any:
    """A file's value as field `name`'s type: an int is taken for a float, and a whole float (1e8) for an int, as
    --set takes them; anything else must be of the field's type (a bool is not an int, a string not a number)."""
    allowed = _field_types(cls)[name]
    if type(value) is float and value.is_integer() and int in allowed and float not in allowed:
        return int(value)
    if type(value) is int and float in allowed:
        return float(value)
    if any(_holds(t, value, exact=True) for t in allowed):
        return value
    raise AxiomError(f"{where} = {value!r}: expected {_type_names(allowed)}")
