"""`axiom chat`: talk to a checkpoint fine-tuned on chat data, in the terminal or for one message.

Interactive: each line you type is a user turn; the reply streams as it is decoded and ends at <|im_end|>.
A line starting with / is a command (COMMANDS: /help lists them; /reset, /system TEXT, /quit or /exit), never
sent to the model; `//TEXT` sends `/TEXT`. Ctrl-D quits, Ctrl-C stops a reply early. When the conversation no
longer fits the model's context, the oldest exchanges are left out of the prompt (the system message stays). With
--message, one reply is printed and the command exits.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from axiom.cli.args import (
    add_decoding_path_arguments,
    add_inference_arguments,
    add_sampling_arguments,
    check_sampling_flags,
    eager_decoding,
)
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
    add_decoding_path_arguments(parser)


def run(args: argparse.Namespace) -> int:
    check_sampling_flags(SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed))
    if args.message is not None and not args.message.strip():
        raise AxiomError("--message is empty: give the text to send, or leave --message out to chat interactively")
    model, meta = load_for_inference(args.ckpt, args.device, args.dtype)
    if not is_chat_tuned(meta):
        print(
            f'notice: {args.ckpt} was not fine-tuned on chat data (no "chat_template": "{TEMPLATE_NAME}" in its '
            "config.json); its replies will not follow the conversation",
            file=sys.stderr,
        )
    compile = not eager_decoding(args, next(model.parameters()).device, "axiom chat")
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    chat = Chat(model, args.system, args.max_new_tokens, compile=compile, **sampling)
    if args.message is not None:
        for piece in chat.reply(args.message):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        return 0
    return interactive(chat, sys.stdin.isatty())


# The interactive commands; any other line is a user turn (a line starting with // sends the text after one /).
COMMANDS = (
    ("/help", "list these commands"),
    ("/reset", "forget the conversation"),
    ("/system TEXT", "set the system message (empty TEXT removes it)"),
    ("/quit", "end the chat (also /exit or Ctrl-D); Ctrl-C stops a reply early"),
)


def interactive(chat: Chat, tty: bool) -> int:
    if tty:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 (line editing and history for input())
        print("axiom chat: /help lists the commands, /quit or Ctrl-D ends")
    while True:
        try:
            line = input("you> " if tty else "").removesuffix("\r")  # piped CRLF text: the line, not its \r
        except EOFError:
            if tty:
                print()
            return 0
        stripped = line.strip()
        if stripped.startswith("//"):
            reply(chat, line.replace("//", "/", 1), tty)
        elif stripped.startswith("/"):
            if not command(chat, stripped):
                return 0
        elif stripped:
            reply(chat, line, tty)


def command(chat: Chat, line: str) -> bool:
    """Carry out the interactive command `line` (it starts with /); False when it ends the chat."""
    name, text = (line.split(None, 1) + [""])[:2]
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        width = max(len(usage) for usage, _ in COMMANDS)
        print("\n".join(f"{usage:<{width}}  {what}" for usage, what in COMMANDS))
        print(f"{'//TEXT':<{width}}  send TEXT starting with /")
    elif name == "/reset":
        chat.reset()
        print("(conversation forgotten)")
    elif name == "/system":
        chat.system = text.strip() or None
        print(f"(system message {'set' if chat.system else 'removed'})")
    else:
        print(f"(unknown command {name}; /help lists the commands; to send it as a message, begin it with //)")
    return True


def reply(chat: Chat, line: str, tty: bool) -> None:
    """Stream the reply to the user turn `line`; Ctrl-C stops it, an error is shown in its place."""
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
