"""`axiom chat`: talk to a checkpoint fine-tuned on chat data, in the terminal or for one message.

Interactive: each line you type is a user turn; the reply streams as it is decoded and ends at <|im_end|>.
`/reset` forgets the conversation, `/system TEXT` sets the system message (empty TEXT removes it), Ctrl-D quits,
Ctrl-C stops a reply early. When the conversation no longer fits the model's context, the oldest exchanges are
left out of the prompt (the system message stays). With --message, one reply is printed and the command exits.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from axiom.cli.args import add_inference_arguments, add_sampling_arguments, check_sampling_flags
from axiom.errors import AxiomError
from axiom.infer.chat import Chat
from axiom.infer.engine import SamplingParams
from axiom.infer.fast import load_for_inference
from axiom.text.chatml import TEMPLATE_NAME, is_chat_tuned


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (fine-tuned on chat data)")
    parser.add_argument("--message", help="send this one user message, print the reply and exit")
    parser.add_argument("--system", help="system message at the start of the conversation")
    add_sampling_arguments(parser, 256, "longest reply", "the n-th reply samples with seed + n")
    add_inference_arguments(parser)


def run(args: argparse.Namespace) -> int:
    check_sampling_flags(SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed))
    model, meta = load_for_inference(args.ckpt, args.device, args.dtype)
    if not is_chat_tuned(meta):
        print(
            f'notice: {args.ckpt} was not fine-tuned on chat data (no "chat_template": "{TEMPLATE_NAME}" in its '
            "config.json); its replies will not follow the conversation",
            file=sys.stderr,
        )
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    chat = Chat(model, args.system, args.max_new_tokens, **sampling)
    if args.message is not None:
        for piece in chat.reply(args.message):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        return 0
    return interactive(chat, sys.stdin.isatty())


def interactive(chat: Chat, tty: bool) -> int:
    if tty:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 (line editing and history for input())
        print("axiom chat: /reset forgets the conversation, /system TEXT sets the system message, Ctrl-D quits")
    while True:
        try:
            line = input("you> " if tty else "")
        except EOFError:
            if tty:
                print()
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            chat.reset()
            print("(conversation forgotten)")
            continue
        if line.strip() == "/system" or line.startswith("/system "):
            chat.system = line[len("/system") :].strip() or None
            print(f"(system message {'set' if chat.system else 'removed'})")
            continue
        sys.stdout.write("axiom> " if tty else "")
        try:
            for piece in chat.reply(line):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except AxiomError as e:
            sys.stdout.write(f"(error: {e})")
        print()
