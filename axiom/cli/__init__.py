"""The `axiom` command: one entry point, one subcommand per module (each has add_arguments and run)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import select
import sys
import time
from typing import NoReturn

from axiom import __version__, torchrun
from axiom.errors import AxiomError
from axiom.signals import sigint_held

# How long a process of torchrun's other than a machine's first waits, after an error, for torchrun to stop it
# (_wait_unless_first): the first meets the same error as late as the processes start apart (seconds, when loaded).
QUIET_WAIT_S = 10.0

# name -> (module, one-line help). Modules are imported only to build their own parser.
COMMANDS = {
    "info": ("axiom.cli.info", "print parameters, tokens, steps, FLOPs and memory of a configuration"),
    "generate": ("axiom.cli.generate", "sample text from a checkpoint (or a randomly initialised preset)"),
    "chat": ("axiom.cli.chat", "talk to a checkpoint fine-tuned on chat data, interactively or one --message"),
    "train": ("axiom.cli.train", "train a preset on prepared data: eval.csv, checkpoints, --resume, torchrun"),
    "eval": ("axiom.cli.eval", "val loss, ppl and bits per byte; lm-eval tasks and multiple-choice files"),
    "plot": ("axiom.cli.plot", "draw train and val loss of a run against tokens to a PNG"),
    "prepare": ("axiom.cli.prepare", "tokenize text corpora into train/val token shards with a manifest"),
    "export": (
        "axiom.cli.export",
        "write a checkpoint as a Hugging Face folder (remote code or Llama) or a GGUF file",
    ),
    "import": ("axiom.cli.import_", "read a Hugging Face folder (axiom or Llama format) into a checkpoint"),
    "bench": (
        "axiom.cli.bench",
        "time training steps, decoding or the loss kernels, optionally against transformers' Llama",
    ),
    "serve": ("axiom.cli.serve", "serve a checkpoint over the OpenAI API (completions, chat), batching requests"),
}

# name -> the examples that end `axiom NAME --help`: command lines that run as written, in the order shown, from the
# repository's folder after `make demo` and `make demo-chat` (tests/test_docs.py runs them).
EXAMPLES = {
    "info": ("axiom info --preset axiom-380m", "axiom info --config configs/sft.toml"),
    "generate": ('axiom generate --ckpt runs/demo/run/checkpoints/best --prompt "And God said"',),
    "chat": (
        "axiom chat --ckpt runs/demo/chat/run/checkpoints/best",
        'axiom chat --ckpt runs/demo/chat/run/checkpoints/best --system "You are terse." '
        '--message "Which book is Ruth 2:4 in?"',
    ),
    "train": ("axiom train --preset tiny --data runs/demo/data --out runs/demo/run --resume",),
    "eval": ("axiom eval --ckpt runs/demo/run/checkpoints/best --data runs/demo/data",),
    "plot": ("axiom plot runs/demo/run",),
    "prepare": (
        "axiom prepare runs/demo/corpus/kjv.jsonl --out data/kjv --workers 2 --val-fraction 0.05",
        "axiom prepare --chat runs/demo/chat/questions/train.jsonl --out data/kjv-chat --seq-len 128",
    ),
    "export": (
        "axiom export --ckpt runs/demo/run/checkpoints/best --out hf/axiom-tiny",
        "axiom export --ckpt runs/demo/run/checkpoints/best --out axiom-tiny-q8_0.gguf --format gguf --dtype q8_0",
    ),
    "import": (
        "axiom export --ckpt runs/demo/run/checkpoints/best --out hf/axiom-tiny-llama --format llama --dtype bf16",
        "axiom import --hf hf/axiom-tiny-llama --out ckpt/imported",
    ),
    "bench": (
        "axiom bench generate --preset tiny --eager --new-tokens 32",
        "axiom bench loss --preset tiny --rows 512 --rounds 1",
    ),
    "serve": ("axiom serve --ckpt runs/demo/run/checkpoints/best",),
}


def examples(name: str) -> str:
    """The end of `axiom NAME --help`."""
    lines = "\n".join(f"  {line}" for line in EXAMPLES[name])
    return f"examples, from the repository's folder after `make demo` and `make demo-chat`:\n{lines}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="axiom", description="Pretrain, evaluate, sample from and publish Axiom-Dense models.")
    parser.add_argument("--version", action="version", version=f"axiom {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=examples(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(module=module)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with SIGINT held while the command modules import (torch: seconds): Ctrl-C inside a C
    extension's import broke it half-way (an ImportError, or an abort), so it is answered once they have. Parsing is
    not held: a usage error's wait under torchrun (_Parser) must answer Ctrl-C at once, as a command error's does."""
    with sigint_held():
        parser = build_parser()
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except KeyboardInterrupt:
        if _says_errors():  # Ctrl-C reaches every process torchrun started
            print("axiom: interrupted", file=sys.stderr)
        return 130
    for stream in (sys.stdin, sys.stdout):  # bytes the locale cannot decode, or an argument's it cannot encode
        with contextlib.suppress(AttributeError, ValueError):  # (surrogates): shown replaced, not a traceback
            stream.reconfigure(errors="replace")
    try:
        return importlib.import_module(args.module).run(args) or 0
    except AxiomError as e:
        _wait_unless_first()
        print(f"axiom {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _says_errors():  # Ctrl-C reaches every process torchrun started
            print(f"axiom {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        # the reader of our output went away (`| head`): stop quietly, as other programs do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python flushes at exit
        return 141


def _says_errors() -> bool:
    """Whether this process prints a command's error. Under torchrun every process of a machine meets the same one
    (the same arguments and files; a device each process could not have is refused on all of them alike), so its
    first process says it and the others wait to be stopped (_wait_unless_first). Once per machine, not per run: a file
    missing on one machine is said there."""
    return torchrun.is_first("LOCAL_RANK")


def _wait_unless_first() -> None:
    """Under torchrun, wait in a process other than a machine's first (_says_errors) before it says an error.
    torchrun stops every process as soon as one exits: another process that met the error first and exited at once
    had the first stopped before it could say it, and the error was said nowhere. So the others wait, and torchrun
    stops them once the first has said it and exited; one still running after QUIET_WAIT_S met an error of its own
    (the first goes on), and says it. A Ctrl-C, which reaches every process, ends the wait and the process silently
    (exit 130), as in a command (main): it was a KeyboardInterrupt traceback inside the error's."""
    if not _says_errors():
        try:
            time.sleep(QUIET_WAIT_S)
        except KeyboardInterrupt:
            raise SystemExit(130) from None


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors (an unknown flag, a missing argument) are said once per machine under
    torchrun, as a command's are: every process printed its usage and the error."""

    def error(self, message: str) -> NoReturn:
        _wait_unless_first()
        super().error(message)


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end is closed (poll reports an error on the writing end)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    return False
