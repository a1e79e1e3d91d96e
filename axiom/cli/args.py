"""Flags that several commands share, each defined once: the preset, config file and overrides, the device, the
inference dtype, the decoding path and the sampling settings."""

from __future__ import annotations

import argparse
import sys

import torch

from axiom import torchrun
from axiom.config import PRESETS, Config, ConfigFile, apply_overrides, get_config, read_config_file
from axiom.dtypes import INFERENCE_DTYPES, describe, dtype_name, spellings
from axiom.errors import AxiomError
from axiom.infer.engine import SamplingParams, decoding_path, default_eager
from axiom.runtime import compile_cache_dir

DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: cuda when available)"
DEFAULT_PRESET = "tiny"


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help=DEVICE_HELP)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset, --config and --set: the configuration of a run, in that order of precedence (last wins)."""
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help=f"named configuration to start from (default: the --config file's preset, else {DEFAULT_PRESET})",
    )
    parser.add_argument(
        "--config",
        action=_Once,
        metavar="FILE",
        help="a .toml file of [model] and [train] field values, or a run's config.json, applied on top of the preset "
        "(docs/training.md#configuration-files)",
    )
    add_overrides_argument(parser, "override any ModelConfig or TrainConfig field, e.g. --set lr_max=1e-3 (repeatable)")


class _Once(argparse.Action):
    """A flag that may be given once: a second --config would silently replace the first, not add to it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice; one file, then --set for what differs")
        setattr(namespace, self.dest, values)


def add_overrides_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE", help=help)


def config_file(args: argparse.Namespace) -> ConfigFile | None:
    return read_config_file(args.config) if args.config is not None else None  # "" is a file that is not there


def preset_of(args: argparse.Namespace, file: ConfigFile | None) -> str:
    """The preset a configuration starts from: --preset, else the config file's `preset`, else tiny."""
    return args.preset or (file.preset if file is not None else None) or DEFAULT_PRESET


def config_from_args(args: argparse.Namespace) -> Config:
    """The preset, the --config file and the --set overrides; settings that probably do not do what was meant are
    named on stderr."""
    file = config_file(args)
    return say_notices(apply_overrides(get_config(preset_of(args, file)), args.overrides, file), args, file)


def say_notices(cfg: Config, args: argparse.Namespace, file: ConfigFile | None) -> Config:
    """`cfg`, after naming on stderr its settings that run but probably not as meant, when --set or --config made
    them."""
    said = (args.overrides or file is not None) and torchrun.is_first("RANK")  # once under torchrun
    for note in cfg.train.notices() if said else []:
        print(f"notice: {note}", file=sys.stderr)
    return cfg


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int, what: str, seeds: str) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p and --seed, shared with `axiom chat`."""
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help=f"{what}, capped by the context (default: {max_new_tokens})",
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    parser.add_argument(
        "--top-k", type=int, default=200, help="sample among the k most likely tokens; 0: all of them (default: 200)"
    )
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1], e.g. 0.95")
    parser.add_argument("--seed", type=int, default=1337, help=f"{seeds} (default: 1337)")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype of the commands that decode (generate, chat, serve)."""
    add_device_argument(parser)
    parser.add_argument(
        "--dtype",
        choices=spellings(INFERENCE_DTYPES),
        default="float32",
        action=_DTypeName,
        metavar="DTYPE",
        help=f"weights for decoding: {describe(INFERENCE_DTYPES)}; int8 is weight-only, one scale per output row; "
        "default: float32",
    )


def add_decoding_path_arguments(parser: argparse.ArgumentParser) -> None:
    """--eager or --compile (generate, chat, serve, bench generate); neither: the device's default
    (`default_eager`)."""
    path = parser.add_mutually_exclusive_group()
    path.add_argument(
        "--eager",
        action="store_true",
        help="decode with the dynamic cache in eager mode (the default on CPU, where it is the faster path)",
    )
    path.add_argument(
        "--compile",
        action="store_true",
        help="decode with the static cache and the torch.compile'd step, CUDA graphs on a GPU (the default on CUDA; "
        "the first run on a machine compiles it, later runs load it from ~/.cache/axiom/inductor)",
    )


def eager_decoding(args: argparse.Namespace, device: torch.device, command: str | None = None) -> bool:
    """Whether to decode eagerly: --eager or --compile, else the default on `device`. With `command`, the compiled
    path is said on stderr: its first run on a machine spends seconds to minutes compiling before the first token."""
    eager = args.eager or (not args.compile and default_eager(device))
    if command and not eager:
        print(
            f"{command}: decoding path: {decoding_path(eager)}; its first run on this machine compiles the step, "
            f"later runs load it from {compile_cache_dir()} (--eager: no compiling)",
            file=sys.stderr,
        )
    return eager


class _DTypeName(argparse.Action):
    """A --dtype in either spelling, kept as torch's name (the one the library takes)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, dtype_name(values))


def check_sampling_flags(params: SamplingParams) -> None:
    """One AxiomError naming the flag whose value is out of range."""
    problem = params.problem()
    if problem:
        name, what = problem
        raise AxiomError(f"--{name.replace('_', '-')} {getattr(params, name)}: {what}")
