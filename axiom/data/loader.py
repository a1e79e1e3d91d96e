"""Token shards on disk (the format `axiom prepare` writes) and the loaders that feed training and evaluation.

A prepared directory holds `manifest.json` and shards `train_00000.bin`, `val_00000.bin`, ... of raw little-endian
uint32 token ids, with EOS after every document. Each split is read as one memory-mapped token stream (shards in
manifest order, never read whole). Training windows are `seq_len + 1` tokens at stride `seq_len`, so the inputs cover
each token once per epoch; their order is a permutation fixed by (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import torch

from axiom.errors import AxiomError
from axiom.files import describe_missing, member, read_json
from axiom.text.tokenizer import EOS_ID, NAME, SHA256, VOCAB_SIZE

FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<u4")  # cl100k_base has 100,277 ids: more than uint16 holds
MASK_DTYPE = np.dtype("u1")  # chat data: 1 where the token is a training target, per token beside each shard
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
MANIFEST_KEYS = (
    "format_version",
    "tokenizer",
    "eos_id",
    "split",
    "shards",
    "train_tokens",
    "val_tokens",
    "train_docs",
    "val_docs",
    "train_bytes",
    "val_bytes",
)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def mask_name(shard_file: str) -> str:
    """The loss-mask file beside a chat data shard: train_00000.bin -> train_00000.mask."""
    return shard_file.removesuffix(".bin") + ".mask"


def data_kind(manifest: dict) -> str:
    """The kind of data a manifest describes, "text" or "chat" (docs/finetuning.md); without the key, text."""
    return manifest.get("kind", "text")


def masks_documents(manifest: dict, doc_masking: bool | None) -> bool:
    """Whether a window's tokens attend only within their own document (conversation) on this data, in training
    and in its evaluation alike: `TrainConfig.doc_masking`, whose None means on for chat data only."""
    return data_kind(manifest) == "chat" if doc_masking is None else doc_masking


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared directory, checked for the keys, types, version and tokenizer this code reads;
    every shard's `file` is a name inside `data_dir`."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise AxiomError(f"{data_dir} {describe_missing(data_dir)}, not a prepared data directory; run `axiom prepare`")
    path = data_dir / MANIFEST
    if not path.is_file():
        what = "not found" if not path.exists() else describe_missing(path)
        raise AxiomError(f"{path} {what}: {data_dir} is not a prepared data directory; run `axiom prepare`")
    manifest = read_json(path, DAMAGED.format(dir=data_dir))
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise AxiomError(f"{path}: missing keys {', '.join(missing)}; {DAMAGED.format(dir=data_dir)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise AxiomError(
            f"{path}: format_version {manifest['format_version']}, this code reads {FORMAT_VERSION}; "
            f"{DAMAGED.format(dir=data_dir)}"
        )
    _check_manifest(manifest, path, data_dir)
    return manifest


DAMAGED = "delete {dir} and run `axiom prepare` again"


def _count(obj: dict, key: str, where: str, fix: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise AxiomError(f"{where}: {key} is {value!r}, expected a count (an integer >= 0); {fix}")
    return value


def _check_manifest(m: dict, path: Path, data_dir: Path) -> None:
    """Types and consistency of the fields the loaders use, so that a hand-edited or damaged manifest fails here
    in one line instead of deep inside training."""
    fix = DAMAGED.format(dir=data_dir)
    tok = m["tokenizer"]
    if not isinstance(tok, dict) or tok.get("name") != NAME or tok.get("sha256") != SHA256:
        raise AxiomError(f"{path}: tokenizer {tok!r} is not this code's {NAME} (sha256 {SHA256[:12]}...); {fix}")
    if m["eos_id"] != EOS_ID:
        raise AxiomError(f"{path}: eos_id {m['eos_id']!r}, but {NAME}'s end-of-text id is {EOS_ID}; {fix}")
    if "split" in m and not isinstance(m["split"], dict):
        raise AxiomError(f"{path}: split is {m['split']!r}, expected an object (val_fraction, split_seed); {fix}")
    shards = m["shards"]
    if not isinstance(shards, list):
        raise AxiomError(f"{path}: shards is {type(shards).__name__}, expected a list; {fix}")
    totals = dict.fromkeys(SPLITS, 0)
    for i, shard in enumerate(shards):
        where = f"{path}: shards[{i}]"
        if not isinstance(shard, dict):
            raise AxiomError(f"{where} is {shard!r}, expected an object; {fix}")
        if "file" not in shard:
            raise AxiomError(f"{where} has no 'file'; {fix}")
        member(data_dir, shard["file"], f"{where}.file")
        if shard.get("split") not in SPLITS:
            raise AxiomError(f"{where}.split is {shard.get('split')!r}, expected one of {', '.join(SPLITS)}; {fix}")
        totals[shard["split"]] += _count(shard, "tokens", where, fix)
    for split in SPLITS:
        for key in ("tokens", "docs", "bytes"):
            _count(m, f"{split}_{key}", str(path), fix)
        if totals[split] != m[f"{split}_tokens"]:
            raise AxiomError(
                f"{path}: the {split} shards hold {totals[split]:,} tokens but {split}_tokens is "
                f"{m[f'{split}_tokens']:,}; {fix}"
            )


def size_mismatch(path: Path, expected: int) -> str | None:
    """What a shard file is ("N bytes", or what stands in its place: "no such file or directory", "is a FIFO", ...)
    when it is not the `expected` bytes its manifest records."""
    if not path.is_file():
        return describe_missing(path)
    actual = path.stat().st_size
    return None if actual == expected else f"{actual:,} bytes"


@contextmanager
def closed_on_error(close: Callable[[], None]) -> Iterator[None]:
    """Call `close` if the block raises: the error's traceback keeps the frames that hold a reader alive, and with
    it the reader's maps and file descriptors, for as long as the caller keeps the error (a notebook, a server)."""
    try:
        yield
    except BaseException:
        close()
        raise


class TokenStream:
    """One split's shards as a single token sequence, memory-mapped; `read` copies out any range.

    Every read is checked against `vocab_size` (default: the tokenizer's), so garbage in a shard of the right size
    is caught where it is read, naming the file, without scanning the shards up front (the first tokens of each
    shard are checked when it is opened). With `masks`, the loss masks of chat data beside the shards instead
    (values 0 and 1)."""

    HEAD_CHECK = 4096  # tokens of each shard checked when it is opened

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        manifest: dict | None = None,
        vocab_size: int | None = None,
        masks: bool = False,
    ) -> None:
        data_dir = Path(data_dir)
        manifest = manifest if manifest is not None else read_manifest(data_dir)
        self.masks = masks
        self.vocab_size = 2 if masks else vocab_size or VOCAB_SIZE
        dtype = MASK_DTYPE if masks else TOKEN_DTYPE
        self.shards: list[np.memmap] = []
        self.paths: list[Path] = []
        sizes = []
        with closed_on_error(self.close):
            for shard in manifest["shards"]:
                if shard["split"] != split or shard["tokens"] == 0:
                    continue
                name = mask_name(shard["file"]) if masks else shard["file"]
                path = member(data_dir, name, f"{data_dir / MANIFEST}: shards[].file")
                expected = shard["tokens"] * dtype.itemsize
                if found := size_mismatch(path, expected):
                    raise AxiomError(
                        f"{path}: {found}, manifest says {shard['tokens']:,} tokens ({expected:,} bytes); "
                        f"the prepared data is damaged: {DAMAGED.format(dir=data_dir)}"
                    )
                self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
                self.paths.append(path)
                sizes.append(shard["tokens"])
            self.offsets = np.cumsum([0, *sizes])  # shard i holds stream positions offsets[i]:offsets[i+1]
            self.num_tokens = int(self.offsets[-1])
            for i in range(len(self.shards)):  # a copy, and no map in a local: a failing check's frames hold none
                self._check(np.array(self.shards[i][: self.HEAD_CHECK]), int(self.offsets[i]))

    def close(self) -> None:
        """Let go of the shards' maps, and so of their file descriptors (`read` hands out copies, never views, so
        nothing else holds them); the stream cannot be read after this."""
        self.shards.clear()  # in place: a list that someone still holds lets go too

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, crossing shard boundaries where needed."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside a stream of {self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        done = 0
        while done < length:
            lo = start + done - int(self.offsets[i])
            n = min(length - done, len(self.shards[i]) - lo)
            out[done : done + n] = self.shards[i][lo : lo + n]
            done += n
            i += 1
        self._check(out, start)
        return out

    def _check(self, tokens: np.ndarray, start: int) -> None:
        """AxiomError naming the shard and position of the first id >= vocab_size in `tokens` (stream from `start`)."""
        if not len(tokens) or int(tokens.max()) < self.vocab_size:
            return
        pos = start + int(np.argmax(tokens >= self.vocab_size))
        i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        value = int(tokens[pos - start])
        what = "mask value" if self.masks else "token id"
        where = f"{self.paths[i]}: {what} {value:,} at token {pos - int(self.offsets[i]):,}"
        if self.masks:
            raise AxiomError(
                f"{where}; a loss mask holds 0 or 1: the file is corrupt; {DAMAGED.format(dir=self.paths[i].parent)}"
            )
        why = (
            f"the model's vocab_size is {self.vocab_size:,}: use a model with {NAME}'s {VOCAB_SIZE:,} ids"
            if value < VOCAB_SIZE
            else f"not a {NAME} id (< {VOCAB_SIZE:,}): the shard is corrupt; {DAMAGED.format(dir=self.paths[i].parent)}"
        )
        raise AxiomError(f"{where}; {why}")


class WindowLoader:
    """What the training loaders share: each call returns one global micro-batch of `micro_batch_size * world_size`
    windows, rank r taking rows [r*B, (r+1)*B) so ranks read disjoint windows; an epoch ends after its last whole
    optimizer step of `step_windows` windows (the sequences of a step over all ranks; default one global batch), so
    that every split of a step into micro-batches, accumulation and ranks reads the same windows, and the next epoch
    starts in a new order fixed by (seed, epoch); `state_dict()` is a few ints that resume on exactly the next batch.
    A subclass sets `size` (and `size_key`, its name in the state, which must match on resume), and says how many
    windows an epoch has and how rows of it are read."""

    size_key = "size"

    def __init__(
        self,
        data_dir: str | Path,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        step_windows: int | None,
    ):
        if seq_len <= 0 or micro_batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise AxiomError(
                f"loader: need seq_len, micro_batch_size, world_size > 0 and 0 <= rank < world_size, got "
                f"seq_len={seq_len}, micro_batch_size={micro_batch_size}, rank={rank}, world_size={world_size}"
            )
        self.data_dir = Path(data_dir)
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = micro_batch_size * world_size
        self.step_windows = step_windows or self.global_batch
        if self.step_windows % self.global_batch:
            raise AxiomError(
                f"loader: a step of {self.step_windows} windows is not a whole number of global batches of "
                f"{self.global_batch} (micro_batch_size {micro_batch_size} x world_size {world_size})"
            )
        self.epoch = 0
        self.position = 0  # windows of this epoch's order already consumed (all ranks)

    def epoch_windows(self) -> int:
        """Windows in the current epoch."""
        raise NotImplementedError

    def read(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `first`..`first + micro_batch_size - 1` of the current epoch's order as (inputs, targets)."""
        raise NotImplementedError

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (micro_batch_size, seq_len) int64 on the CPU."""
        windows = self.epoch_windows()
        whole_steps = windows - windows % self.step_windows if windows >= self.step_windows else windows
        if self.position + self.global_batch > whole_steps:
            self.epoch += 1
            self.position = 0
        first = self.position + self.rank * self.micro_batch_size
        self.position += self.global_batch
        return self.read(first)

    def state_dict(self) -> dict:
        keys = ("epoch", "position", "seed", "seq_len", self.size_key)
        return {key: getattr(self, "size" if key == self.size_key else key) for key in keys}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", self.size_key):
            ours = getattr(self, "size" if key == self.size_key else key)
            if state.get(key) != ours:
                raise AxiomError(
                    f"loader state has {key}={state.get(key)}, but this loader over {self.data_dir} has "
                    f"{key}={ours}; resume with the same data, seq_len and seed"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class TrainLoader(WindowLoader):
    """Shuffled `(inputs, targets)` windows of the train split (see WindowLoader); targets are inputs shifted by one.
    Window w covers tokens [w*seq_len, w*seq_len + seq_len + 1): the +1 is the last target, so the inputs cover each
    token once per epoch; an epoch takes them in the order of a permutation fixed by (seed, epoch)."""

    size_key = "num_windows"

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
        """`vocab_size`: the model's; a token id at or above it fails the batch that reads it (default: the
        tokenizer's vocabulary)."""
        super().__init__(data_dir, seq_len, micro_batch_size, seed, rank, world_size, step_windows)
        self.stream = TokenStream(data_dir, "train", vocab_size=vocab_size)
        self.size = max(self.stream.num_tokens - 1, 0) // seq_len
        with closed_on_error(self.stream.close):
            if self.size < self.global_batch:
                raise AxiomError(
                    f"{data_dir}: the train split has {self.stream.num_tokens:,} tokens, fewer than one global batch "
                    f"needs ({self.global_batch} windows of {seq_len}+1 tokens = "
                    f"{self.global_batch * seq_len + 1:,} tokens); prepare more data or lower seq_len/batch size"
                )
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
            self._perm_epoch = self.epoch
        return self._perm

    def epoch_windows(self) -> int:
        return self.size

    def read(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self._permutation()[first : first + self.micro_batch_size]
        L = self.seq_len
        batch = torch.from_numpy(np.stack([self.stream.read(int(w) * L, L + 1) for w in windows]))  # (B, L+1)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def eval_windows(val_tokens: int, seq_len: int, eval_tokens: int) -> int:
    """How many windows of `seq_len` (+1 for the targets) an evaluation of `eval_tokens` covers in a val split of
    `val_tokens`."""
    return min(eval_tokens // seq_len, max(val_tokens - 1, 0) // seq_len)


def eval_batches(
    data_dir: str | Path,
    seq_len: int,
    batch_size: int,
    eval_tokens: int,
    vocab_size: int | None = None,
    manifest: dict | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `eval_tokens` of the val split as consecutive windows, in order; the last batch may be smaller.

    Covers `eval_windows` windows; every rank and every call sees the same batches. `manifest`: the data's, where
    the caller has read it."""
    if seq_len <= 0 or batch_size <= 0 or eval_tokens < seq_len:
        raise AxiomError(
            f"evaluation: need seq_len > 0, batch size > 0 and eval tokens >= seq_len, got seq_len={seq_len}, "
            f"batch size {batch_size}, eval tokens {eval_tokens}"
        )
    # closed on an error too (see closed_on_error), and when the caller stops early
    with closing(TokenStream(data_dir, "val", manifest, vocab_size)) as stream:
        num_windows = eval_windows(stream.num_tokens, seq_len, eval_tokens)
        if num_windows == 0:
            raise AxiomError(
                f"{data_dir}: the val split has {stream.num_tokens:,} tokens, fewer than one window of "
                f"{seq_len}+1; prepare with a larger --val-fraction or lower seq_len"
            )
        for first in range(0, num_windows, batch_size):
            n = min(batch_size, num_windows - first)
            batch = torch.from_numpy(stream.read(first * seq_len, n * seq_len + 1))
            inputs = batch[:-1].view(n, seq_len)
            targets = batch[1:].view(n, seq_len)
            yield inputs, targets
