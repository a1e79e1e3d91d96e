"""`axiom chat`: talk to a checkpoint fine-tuned on chat data, in the terminal or for one message.

Interactive: each line you type is a user turn; the reply streams as it is decoded and ends at <|im_end|>.
`/reset` forgets the conversation, `/system TEXT` sets the system message (empty TEXT removes it), Ctrl-D quits,
Ctrl-C stops a reply early. When the conversation no longer fits the model's context, the oldest exchanges are
left out of the prompt (the system message stays). With --message, one reply is printed and the command exits.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import sys
from collections.abc import Iterator

from axiom.cli.args import add_inference_arguments, add_sampling_arguments, check_sampling_flags
from axiom.cli.generate import load_for_inference, token_bytes
from axiom.errors import AxiomError
from axiom.infer.engine import Engine
from axiom.infer.generate import SamplingParams, stream
from axiom.model.transformer import Axiom
from axiom.text.chatml import IM_END, IM_START, TEMPLATE_NAME, encode_chat, is_chat_tuned
from axiom.text.tokenizer import EOS_ID, load_tokenizer

STOP = (IM_END, IM_START, EOS_ID)  # the end of the turn; a new turn or EOS also ends it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (fine-tuned on chat data)")
    parser.add_argument("--message", help="send this one user message, print the reply and exit")
    parser.add_argument("--system", help="system message at the start of the conversation")
    add_sampling_arguments(parser, 256, "longest reply", "the n-th reply samples with seed + n")
    add_inference_arguments(parser)


class Chat:
    """A conversation with a model: the messages so far and the sampling settings of its replies."""

    def __init__(self, model: Axiom, system: str | None, max_new_tokens: int, **sampling) -> None:
        self.model, self.system, self.max_new_tokens, self.sampling = model, system, max_new_tokens, sampling
        self.history: list[dict] = []  # user and assistant messages, alternating
        self.turns = 0
        self.engine = Engine(model, max_batch=1)  # one cache for the whole conversation, not one per reply

    def prompt(self, user: str) -> tuple[list[int], int]:
        """Ids of the conversation plus `user` and the generation prompt, the oldest exchanges left out until
        there is room for a reply; and how many tokens that reply may have."""
        limit = self.model.cfg.max_seq_len
        room = min(self.max_new_tokens, limit // 2)  # a long history never squeezes a reply below this
        system = [{"role": "system", "content": self.system}] if self.system else []
        history = self.history
        while True:
            ids = encode_chat([*system, *history, {"role": "user", "content": user}], add_generation_prompt=True).ids
            if len(ids) + room <= limit or not history:
                break
            history = history[2:]
        if len(ids) >= limit:
            raise AxiomError(
                f"the message and system prompt take {len(ids):,} tokens, the model's context is {limit:,}; "
                "send a shorter message"
            )
        return ids, min(self.max_new_tokens, limit - len(ids))

    def reply(self, user: str) -> Iterator[str]:
        """Stream the reply to `user` as text pieces; the exchange joins the history when the reply ends
        (also when it is stopped early)."""
        ids, budget = self.prompt(user)
        enc = load_tokenizer()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        seed = self.sampling["seed"] + self.turns if self.sampling["seed"] is not None else None
        kwargs = {**self.sampling, "seed": seed}
        text = ""
        try:
            for step in stream(self.model, [ids], budget, eos_id=IM_END, engine=self.engine, **kwargs):
                token = int(step[0])
                if token in STOP:
                    break
                piece = decoder.decode(token_bytes(enc, token))
                text += piece
                yield piece
            tail = decoder.decode(b"", final=True)
            text += tail
            yield tail
        finally:
            self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
            self.turns += 1

    def reset(self) -> None:
        self.history = []


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
