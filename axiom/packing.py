"""Chat data for training and evaluation: whole conversations packed into windows, targets masked.

A chat directory (`axiom prepare --chat`, docs/finetuning.md) holds each split as one token stream with EOS after
every conversation, and beside it a loss mask (1 where the token is a training target). A window holds whole
conversations, never part of one: they are laid end to end until the next would not fit in `seq_len + 1` tokens,
and the rest is padding. Inputs are the window's first `seq_len` tokens; the target at position t is token t + 1
where its mask is 1, else -100 (ignored by the loss), so padding and prompts are never trained on.

Training packs the conversations of each epoch in the order of a permutation fixed by (seed, epoch); evaluation
packs the val split in stream order. Attention is not masked between the conversations of a window
(docs/finetuning.md has the measurement behind that choice).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from axiom.errors import AxiomError
from axiom.loader import TokenStream, read_manifest
from axiom.model import IGNORE_INDEX
from axiom.tokenizer import EOS_ID

OPEN_WINDOWS = 16  # windows that packing fills at a time (see `pack`)


class Conversations:
    """One split of a chat directory: its token stream, its mask stream, and where each conversation starts."""

    def __init__(
        self, data_dir: str | Path, split: str, manifest: dict | None = None, vocab_size: int | None = None
    ) -> None:
        manifest = manifest if manifest is not None else read_manifest(data_dir)
        self.tokens = TokenStream(data_dir, split, manifest, vocab_size)
        self.masks = TokenStream(data_dir, split, manifest, masks=True)
        shards = zip(self.tokens.shards, self.tokens.offsets[:-1], strict=True)
        ends = [np.flatnonzero(np.asarray(s) == EOS_ID) + offset + 1 for s, offset in shards]
        self.starts = np.concatenate([[0], *ends]).astype(np.int64)  # (n + 1,): i is [starts[i], starts[i + 1])
        if self.starts[-1] != self.tokens.num_tokens:
            raise AxiomError(f"{data_dir}: the {split} split does not end with EOS; re-run `axiom prepare --chat`")
        self.lengths = np.diff(self.starts)

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


class ChatLoader:
    """TrainLoader's interface over chat data: shuffled windows of whole conversations, masked targets.

    Epoch e packs the conversations in the order `default_rng([seed, e]).permutation(n)`; a global micro-batch
    is `micro_batch_size * world_size` windows of that packing, rank r taking rows [r*B, (r+1)*B). When fewer
    windows than a global batch remain, the next epoch starts. `state_dict()` resumes on exactly the next batch.
    """

    def __init__(
        self,
        data_dir: str | Path,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
    ) -> None:
        if seq_len <= 0 or micro_batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise AxiomError(
                f"loader: need seq_len, micro_batch_size, world_size > 0 and 0 <= rank < world_size, got "
                f"seq_len={seq_len}, micro_batch_size={micro_batch_size}, rank={rank}, world_size={world_size}"
            )
        self.data_dir = Path(data_dir)
        self.data = Conversations(data_dir, "train", vocab_size=vocab_size)
        self.data.check_fit(seq_len, str(data_dir))
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = micro_batch_size * world_size
        self.num_conversations = len(self.data)
        self.epoch = 0
        self.position = 0  # windows of this epoch's packing already consumed (all ranks)
        self._packed_epoch = -1
        if self.windows() < self.global_batch:
            raise AxiomError(
                f"{data_dir}: the train split packs into {self.windows()} windows of {seq_len}+1 tokens, fewer "
                f"than one global batch ({self.global_batch}); prepare more conversations or lower the batch size"
            )

    def _packing(self) -> Packing:
        if self._packed_epoch != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_conversations)
            self._packed = pack(self.data.lengths, order, self.seq_len + 1)
            self._packed_epoch = self.epoch
        return self._packed

    def windows(self) -> int:
        """Windows in this epoch's packing (other epochs differ by a few)."""
        return len(self._packing())

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (micro_batch_size, seq_len) int64 on the CPU; targets -100 where not trained."""
        if self.position + self.global_batch > self.windows():
            self.epoch += 1
            self.position = 0
        packing = self._packing()
        first = self.position + self.rank * self.micro_batch_size
        self.position += self.global_batch
        windows = range(first, first + self.micro_batch_size)
        return to_batch([self.data.window(packing.window(w), self.seq_len) for w in windows])

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_conversations": self.num_conversations,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "num_conversations"):
            if state.get(key) != getattr(self, key):
                raise AxiomError(
                    f"loader state has {key}={state.get(key)}, but this loader over {self.data_dir} has "
                    f"{key}={getattr(self, key)}; resume with the same data, seq_len and seed"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def chat_eval_batches(
    data_dir: str | Path, seq_len: int, batch_size: int, eval_tokens: int, vocab_size: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The val split's conversations packed in stream order: the first `eval_tokens // seq_len` windows (at least
    one), in batches of `batch_size` (the last may be smaller); the same on every rank and call."""
    data = Conversations(data_dir, "val", vocab_size=vocab_size)
    if len(data) == 0:
        raise AxiomError(f"{data_dir}: the val split has no conversations; prepare with a larger --val-fraction")
    data.check_fit(seq_len, str(data_dir))
    packing = pack(data.lengths, np.arange(len(data)), seq_len + 1)
    num_windows = min(max(eval_tokens // seq_len, 1), len(packing))
    for first in range(0, num_windows, batch_size):
        windows = range(first, min(first + batch_size, num_windows))
        yield to_batch([data.window(packing.window(w), seq_len) for w in windows])
