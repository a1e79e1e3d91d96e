"""A held-out multiple-choice file from real text: the validation split of a prepared data directory.

Reads the documents that `axiom prepare` read (the sources listed in DIR/manifest.json), keeps those that its split
rule put in the validation split (so a model trained on DIR never saw them), cuts them into sentences, and writes
one item per sentence of at least --min-words words: the context is the sentence before it plus the sentence's first
half; the choices are the next --ending-words words (0: the rest of the sentence) and the same span of --choices - 1
other held-out sentences of about the same length (drawn from the 10 nearest in characters, so that neither acc nor
acc_norm can win by length alone), in a random order. Chance is 1 / --choices; a model that has learned how the text
goes on should beat it. Short endings test the fit to the context; whole half-sentences are much harder (most of
their likelihood does not depend on the context).

    python scripts/make_choices.py --data runs/demo/data --out runs/demo/kjv_choices.jsonl
    axiom eval --ckpt runs/demo/run/checkpoints/best --task-file runs/demo/kjv_choices.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from axiom.data.loader import data_kind, read_manifest
from axiom.data.sources import is_val, plan_units, read_unit
from axiom.errors import AxiomError, run_script
from axiom.files import atomic_file

SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
NEAREST = 10  # distractors come from this many held-out endings closest in length to the right one


def held_out_documents(data_dir: Path) -> list[str]:
    """The validation-split documents of a prepared directory, read again from its sources."""
    manifest = read_manifest(data_dir)
    if data_kind(manifest) == "chat":
        raise AxiomError(f"{data_dir}: chat data (axiom prepare --chat); pass a text corpus's prepared directory")
    files = [Path(s["path"]) for s in manifest["sources"]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise AxiomError(f"{data_dir}: the sources it was prepared from are gone ({', '.join(missing[:3])})")
    split, field = manifest["split"], manifest.get("text_field", "text")
    salt = f"{split['split_seed']}:".encode()
    return [
        text
        for unit in plan_units(files, field)
        for text in read_unit(unit, field)
        if text and is_val(text.encode("utf-8"), salt, split["val_fraction"])
    ]


def make_items(
    docs: list[str], n_items: int, n_choices: int, min_words: int, ending_words: int, seed: int
) -> list[dict]:
    """Items in the generic task-file format (context, choices, answer); see the module docstring."""
    pairs = []  # (sentence before, sentence)
    for doc in docs:
        sentences = [" ".join(s.split()) for s in SENTENCE_END.split(doc) if s.strip()]
        pairs += [(a, b) for a, b in zip(sentences, sentences[1:], strict=False) if len(b.split()) >= min_words]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    words = [b.split() for _, b in pairs]
    span = [slice(len(w) // 2, len(w) // 2 + ending_words if ending_words else None) for w in words]
    endings = sorted({" ".join(w[s]) for w, s in zip(words, span, strict=True)})
    if len(endings) < n_choices:
        return []
    items = []
    for (before, _), w, s in zip(pairs[:n_items], words, span, strict=False):
        right = " ".join(w[s])
        nearest = [e for e in endings if e != right]
        rng.shuffle(nearest)  # ties in length are broken at random, not alphabetically
        nearest.sort(key=lambda e: abs(len(e) - len(right)))
        choices = rng.sample(nearest[: max(NEAREST, n_choices - 1)], n_choices - 1)
        answer = rng.randrange(n_choices)
        choices.insert(answer, right)
        items.append({"context": before + " " + " ".join(w[: s.start]), "choices": choices, "answer": answer})
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="prepared data directory (from axiom prepare)")
    parser.add_argument("--out", required=True, type=Path, help="JSONL task file to write")
    parser.add_argument("--items", type=int, default=500, help="at most this many items (default: %(default)s)")
    parser.add_argument("--choices", type=int, default=4, help="choices per item (default: %(default)s)")
    parser.add_argument("--min-words", type=int, default=8, help="shortest sentence used (default: %(default)s)")
    parser.add_argument(
        "--ending-words", type=int, default=3, help="words per choice; 0: the rest of the sentence (default: 3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentence and distractor draw")
    args = parser.parse_args(argv)
    for flag, value, least in [
        ("--items", args.items, 1),
        ("--choices", args.choices, 2),
        ("--min-words", args.min_words, 1),
        ("--ending-words", args.ending_words, 0),
    ]:
        if value < least:
            parser.error(f"{flag} {value}: must be at least {least}")
    docs = held_out_documents(args.data)
    items = make_items(docs, args.items, args.choices, args.min_words, args.ending_words, args.seed)
    if not items:
        raise AxiomError(f"{args.data}: too few held-out sentences of {args.min_words}+ words; lower --min-words")
    with atomic_file(args.out) as tmp:
        tmp.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"wrote {args.out}: {len(items)} items from {len(docs)} held-out documents, chance {1 / args.choices:.2f}")
    return 0


if __name__ == "__main__":
    run_script(main)
