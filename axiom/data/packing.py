"""Chat data for training and evaluation: whole conversations packed into windows, targets masked.

A chat directory (`axiom prepare --chat`, docs/finetuning.md) holds each split as one token stream with EOS after
every conversation, and beside it a loss mask (1 where the token is a training target). A window holds whole
conversations, never part of one: they are laid end to end until the next would not fit in `seq_len + 1` tokens,
and the rest is padding. Inputs are the window's first `seq_len` tokens; the target at position t is token t + 1
where its mask is 1, else -100 (ignored by the loss), so padding and prompts are never trained on.

Training packs the conversations of each epoch in the order of a permutation fixed by (seed, epoch); evaluation
packs the val split in stream order. Whether a conversation's tokens may attend to the other conversations of its
window is `TrainConfig.doc_masking` (masked by default for chat data; docs/finetuning.md has the measurement).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from axiom.data.loader import TokenStream, WindowLoader, closed_on_error, read_manifest
from axiom.errors import AxiomError
from axiom.model.loss import IGNORE_INDEX
from axiom.text.tokenizer import EOS_ID

OPEN_WINDOWS = 16  # windows that packing fills at a time (see `pack`)


class Conversations:
    """One split of a chat directory: its token stream, its mask stream, and where each conversation starts."""

    def __init__(
        self, data_dir: str | Path, split: str, manifest: dict | None = None, vocab_size: int | None = None
    ) -> None:
        manifest = manifest if manifest is not None else read_manifest(data_dir)
        self.tokens = TokenStream(data_dir, split, manifest, vocab_size)
        with closed_on_error(self.tokens.close):
            self.masks = TokenStream(data_dir, split, manifest, masks=True)
        with closed_on_error(self.close):
            # no zip in a local: it keeps its last pair, a map, alive in the frame an error's traceback holds
            shards = self.tokens.shards
            ends = [np.flatnonzero(np.asarray(s) == EOS_ID) + self.tokens.offsets[i] + 1 for i, s in enumerate(shards)]
            self.starts = np.concatenate([[0], *ends]).astype(np.int64)  # (n + 1,): i is [starts[i], starts[i + 1])
            if self.starts[-1] != self.tokens.num_tokens:
                raise AxiomError(f"{data_dir}: the {split} split does not end with EOS; re-run `axiom prepare --chat`")
        self.lengths = np.diff(self.starts)

    def close(self) -> None:
        """Let go of both streams' maps and file descriptors (TokenStream.close)."""
        self.tokens.close()
        self.masks.close()

    def __len__(self) -> int:
        return len(self.lengths)

    def check_fit(self, seq_len: int, where: str) -> None:
        longest = int(self.lengths.max()) if len(self) else 0
        if longest > seq_len + 1:
            raise AxiomError(
                f"{where}: a conversation of {longest:,} tokens does not fit a window of seq_len={seq_len} (+1); "
                f"prepare with --seq-len {seq_len} or train with a larger seq_len"
            )

    def window(self, conversations: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """The (inputs, targets) of one window holding `conversations`, each (seq_len,) int64."""
        tokens = np.full(seq_len + 1, EOS_ID, dtype=np.int64)
        mask = np.zeros(seq_len + 1, dtype=np.int64)
        at = 0
        for c in conversations:
            start, n = int(self.starts[c]), int(self.lengths[c])
            tokens[at : at + n] = self.tokens.read(start, n)
            mask[at : at + n] = self.masks.read(start, n)
            at += n
        return tokens[:-1], np.where(mask[1:] == 1, tokens[1:], IGNORE_INDEX)


@dataclass
class Packing:
    """Window w holds conversations members[cuts[w]:cuts[w + 1]]."""

    members: np.ndarray
    cuts: np.ndarray

    def __len__(self) -> int:
        return len(self.cuts) - 1

    def window(self, w: int) -> np.ndarray:
        return self.members[self.cuts[w] : self.cuts[w + 1]]


def pack(lengths: np.ndarray, order: np.ndarray, capacity: int, open_windows: int = OPEN_WINDOWS) -> Packing:
    """Conversations taken in `order`, packed whole into windows of `capacity` tokens: each goes into the first of
    the `open_windows` most recent windows with room for it, or opens a new one (the oldest open window is then
    closed). Next fit (one open window) leaves about a fifth of each window empty when conversations are a third
    of it long; a few open windows fill them nearly full while keeping the shuffled order."""
    closed: list[list[int]] = []
    windows: list[list[int]] = []  # open: conversation indices
    used: list[int] = []
    for c, n in zip(order.tolist(), lengths[order].tolist(), strict=True):
        w = next((i for i, u in enumerate(used) if u + n <= capacity), None)
        if w is None:
            if len(windows) == open_windows:
                closed.append(windows.pop(0))
                used.pop(0)
            windows.append([])
            used.append(0)
            w = len(windows) - 1
        windows[w].append(c)
        used[w] += n
    closed += windows
    cuts = np.cumsum([0, *map(len, closed)])
    members = np.fromiter((c for w in closed for c in w), dtype=np.int64, count=int(cuts[-1]))
    return Packing(members, cuts)


def to_batch(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.from_numpy(np.stack([x for x, _ in rows]))
    targets = torch.from_numpy(np.stack([y for _, y in rows]))
    return inputs, targets


class ChatLoader(WindowLoader):
    """TrainLoader's interface over chat data (see WindowLoader): windows of whole conversations, masked targets.
    Epoch e packs the conversations in the order `default_rng([seed, e]).permutation(n)`."""

    size_key = "num_conversations"

    def __init__(
        self,
        data_dir: str | Path,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
        step_windows: int | None = None,
    ) -> None:
        super().__init__(data_dir, seq_len, micro_batch_size, seed, rank, world_size, step_windows)
        self.data = Conversations(data_dir, "train", vocab_size=vocab_size)
        with closed_on_error(self.data.close):
            self.data.check_fit(seq_len, str(data_dir))
            self.size = len(self.data)
            self._packed_epoch = -1
            if self.epoch_windows() < self.global_batch:
                raise AxiomError(
                    f"{data_dir}: the train split packs into {self.epoch_windows()} windows of {seq_len}+1 tokens, "
                    f"fewer than one global batch ({self.global_batch}); prepare more conversations or lower the "
                    "batch size"
                )

    @property
    def num_conversations(self) -> int:
        return self.size

    def _packing(self) -> Packing:
        if self._packed_epoch != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
            self._packed = pack(self.data.lengths, order, self.seq_len + 1)
            self._packed_epoch = self.epoch
        return self._packed

    def epoch_windows(self) -> int:
        """Windows in this epoch's packing (other epochs differ by a few)."""
        return len(self._packing())

    def read(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets -100 where not trained."""
        packing = self._packing()
        windows = range(first, first + self.micro_batch_size)
        return to_batch([self.data.window(packing.window(w), self.seq_len) for w in windows])


def chat_eval_windows(seq_len: int, eval_tokens: int) -> int:
    """The windows of packed conversations an evaluation reads at most (fewer where the val split packs into fewer):
    `eval_tokens // seq_len`, at least one. Only their replies are scored, so the tokens counted are fewer still."""
    return max(eval_tokens // seq_len, 1)


def chat_eval_batches(
    data_dir: str | Path,
    seq_len: int,
    batch_size: int,
    eval_tokens: int,
    vocab_size: int | None = None,
    manifest: dict | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The val split's conversations packed in stream order: the first `eval_tokens // seq_len` windows (at least
    one), in batches of `batch_size` (the last may be smaller); the same on every rank and call. `manifest` as in
    `eval_batches`."""
    # closed on an error too (see closed_on_error), and when the caller stops early
    with closing(Conversations(data_dir, "val", manifest, vocab_size)) as data:
        if len(data) == 0:
            raise AxiomError(f"{data_dir}: the val split has no conversations; prepare with a larger --val-fraction")
        data.check_fit(seq_len, str(data_dir))
        packing = pack(data.lengths, np.arange(len(data)), seq_len + 1)
        num_windows = min(chat_eval_windows(seq_len, eval_tokens), len(packing))
        for first in range(0, num_windows, batch_size):
            windows = range(first, min(first + batch_size, num_windows))
            yield to_batch([data.window(packing.window(w), seq_len) for w in windows])
