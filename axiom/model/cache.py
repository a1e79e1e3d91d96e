"""The KV cache: keys and values of every layer for a batch of sequences, filled left to right."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from axiom.config import ModelConfig


@dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences (rows), each filled left to right from slot 0.

    Every row has its own fill level, so rows holding texts of different lengths decode together (the engine's
    slots, axiom/infer/engine.py): a row's new keys go after its own filled slots, its positions count from its
    own start, and it attends to its own filled slots only. Slots beyond a row's fill level may hold stale keys
    from an earlier text; they are always masked.

    A dynamic cache (the default) keeps the fill levels as Python ints in `lengths`, so shapes are decided without
    reading the device: when every row is filled alike (one sequence, or a batch in step) it attends over the
    filled slots with no mask at all, the fast path. A static cache (`static=True`) keeps every shape fixed:
    attention spans all max_len slots under a mask (compiled on a GPU, a block mask whose kernel reads each row's
    filled blocks alone: `axiom.model.transformer.filled_slots_mask`) and the fill levels are the device tensor
    `positions`, advanced in place, so one compiled graph (or CUDA graph) serves every decoding step.
    """

    keys: list[Tensor]  # per layer (B, n_kv_heads, max_len, head_dim)
    values: list[Tensor]
    lengths: list[int]  # dynamic cache: slots filled per row
    positions: Tensor | None = None  # static cache: (B,) int64 slots filled per row, advanced in place
    slots: Tensor | None = None  # (B, T) slots the current forward writes, when rows differ (set by `write_at`)
    row_ids: Tensor | None = None  # (B, 1) each row's index, set with `slots`: built once per forward, not per layer

    @property
    def static(self) -> bool:
        return self.positions is not None

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype, static: bool = False) -> KVCache:
        """A cache of `batch` empty rows of `max_len` slots. Zeros, not garbage: a masked slot still meets a
        zero attention weight, and 0 * NaN would be NaN."""
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        new = lambda: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]  # noqa: E731
        positions = torch.zeros(batch, dtype=torch.long, device=device) if static else None
        return cls(new(), new(), [0] * batch, positions)

    def rows(self, start: int, n: int) -> KVCache:
        """A cache over rows start..start+n-1 that shares this one's storage (its keys, values and positions
        are views). A dynamic view's `lengths` is a copy: the owner updates its own after the forward."""
        view = lambda ts: [t.narrow(0, start, n) for t in ts]  # noqa: E731
        positions = self.positions.narrow(0, start, n) if self.static else None
        return KVCache(view(self.keys), view(self.values), self.lengths[start : start + n], positions)

    def write_at(self, slots: Tensor) -> None:
        """Have the current forward write row b's new keys at slots[b] (B, T) in every layer, until `advance`."""
        self.slots = slots
        self.row_ids = torch.arange(slots.shape[0], device=slots.device)[:, None]  # (B, 1) against slots (B, T)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_kv, T, hd) after each row's filled slots; return the keys and values to attend over
        (the filled ones, or every slot of a static cache)."""
        T = k.shape[2]
        if self.slots is None:  # rows filled alike: one contiguous block, narrow + copy_ (fewest ops)
            start = self.lengths[0]
            self.keys[layer].narrow(2, start, T).copy_(k)
            self.values[layer].narrow(2, start, T).copy_(v)
            return self.keys[layer].narrow(2, 0, start + T), self.values[layer].narrow(2, 0, start + T)
        # Each row's own slots, as an indexed assignment: compiled, it writes the new slots in place, where a
        # scatter_ was compiled into a copy of the whole cache per layer and step (docs/benchmarks.md).
        self.keys[layer][self.row_ids, :, self.slots] = k.transpose(1, 2)  # (B, T, n_kv, hd)
        self.values[layer][self.row_ids, :, self.slots] = v.transpose(1, 2)
        if self.static:
            return self.keys[layer], self.values[layer]
        end = max(self.lengths) + T
        return self.keys[layer].narrow(2, 0, end), self.values[layer].narrow(2, 0, end)

    def advance(self, T: int) -> None:
        """Count the T tokens just written into every row."""
        if self.static:
            self.positions.add_(T)
        else:
            self.lengths = [n + T for n in self.lengths]
        self.slots = self.row_ids = None
