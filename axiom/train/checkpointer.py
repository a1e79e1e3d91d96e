"""The run's checkpoints: step_N (weights, optimizer, loader, RNG of every rank, `TrainState`), pruned to the newest
keep_checkpoints, and best/ (the weights of the lowest val loss). A checkpoint always holds weights that training
can continue from; a checkpoint of this run can be loaded back in process (a rollback)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from axiom.config import Config
from axiom.data.loader import TrainLoader, data_kind
from axiom.data.packing import ChatLoader
from axiom.errors import AxiomError
from axiom.model.checkpoint import (
    WEIGHTS,
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    read_meta,
    rng_state,
    save_training_state,
    save_weights,
    set_rng_state,
    step_dir_name,
    write_dir_atomic,
)
from axiom.model.transformer import Axiom
from axiom.text.chatml import TEMPLATE_NAME
from axiom.train.optim import set_hyperparameters
from axiom.train.parallel import Dist, full_state, load_optimizer_state, set_model_state
from axiom.train.runlog import RunLog
from axiom.train.state import TrainState

# The fields of `data_record` that a run's data keeps from its first step to its last (its folder may move)
DATA_IDENTITY = ("kind", "train_tokens", "val_tokens", "train_docs", "val_docs", "val_fraction", "split_seed")


def data_record(data_dir: Path, manifest: dict) -> dict:
    """What a checkpoint says about its data, so a model card can name it without the run's command line."""
    return {
        "dir": str(data_dir),
        "kind": data_kind(manifest),
        "sources": [Path(s["path"]).name for s in manifest["sources"]],
        **{k: manifest[k] for k in ("train_tokens", "val_tokens", "train_docs", "val_docs")},
        **{k: manifest["split"][k] for k in ("val_fraction", "split_seed")},
    }


def checkpoint_record(data_dir: Path, manifest: dict) -> dict:
    """What every checkpoint of a run on this data records beside its step: the data, and for chat data the
    template that export, serve and chat apply."""
    chat = data_kind(manifest) == "chat"
    return {"data": data_record(data_dir, manifest), **({"chat_template": TEMPLATE_NAME} if chat else {})}


def set_aside_newer(ckpt_root: Path, step: int, log: RunLog) -> None:
    """Rename the run's step folders after `step` (-1: all of them) to abandoned-step_N, so that --resume never
    picks them again (a rollback, a stop for bad steps, --resume-from an older checkpoint or --resume past ones that
    do not verify, complete or not, leaves them behind); nothing is deleted."""
    why = "after the checkpoint training continues from" if step >= 0 else "--resume starts fresh"
    for newer_step, path in list_checkpoints(ckpt_root, complete=False):
        if newer_step > step:
            target = path.with_name(f"abandoned-{path.name}")
            n = 1
            while target.exists():
                n += 1
                target = path.with_name(f"abandoned{n}-{path.name}")
            path.rename(target)
            log.info(f"set aside {path} ({why}) as {target.name}")


def recorded_best(ckpt_root: Path) -> tuple[int, float] | None:
    """The step and val loss that best/ records; None where there is no readable best/."""
    try:
        meta = read_meta(ckpt_root / "best")
    except AxiomError:
        return None
    step, loss = meta.get("step"), meta.get("val_loss")
    if isinstance(step, int) and isinstance(loss, float) and math.isfinite(loss):
        return step, loss
    return None


class Checkpointer:
    """Saves and restores what a run needs to continue exactly: the model (`raw`, unwrapped), its optimizer and
    the loader's position. Under FSDP every rank takes part in saving; rank 0 writes."""

    def __init__(
        self,
        cfg: Config,
        root: Path,
        model: Axiom,
        optimizer: torch.optim.Optimizer,
        optimizer_name: str,
        loader: TrainLoader | ChatLoader,
        d: Dist,
        fsdp: bool,
        record: dict,
        log: RunLog,
    ) -> None:
        self.cfg, self.root, self.d, self.fsdp, self.record, self.log = cfg, root, d, fsdp, record, log
        self.model, self.optimizer, self.optimizer_name, self.loader = model, optimizer, optimizer_name, loader
        self.pending = False  # a checkpoint was due during a streak of bad steps

    def restore(self, saved: dict) -> TrainState:
        """Optimizer, loader and RNG from a checkpoint's state.pt, and its TrainState (the weights are loaded
        apart)."""
        try:
            load_optimizer_state(self.model, self.optimizer, saved["optimizer"], self.fsdp)
        except (KeyError, ValueError, TypeError) as e:  # torch's own checks of the groups and their sizes
            raise AxiomError(
                f"the checkpoint's optimizer state does not fit this model's parameters ({type(e).__name__}: "
                f"{str(e)[:160]}); resume from another checkpoint with --resume-from CKPT"
            ) from None
        set_hyperparameters(self.optimizer, self.cfg.train)  # the run's own, where a resume changed them
        self.loader.load_state_dict(saved["loader"])
        rngs = saved["rng"]
        if len(rngs) == self.d.world_size:
            set_rng_state(rngs[self.d.rank])
        else:  # saved by another number of processes: each rank its own generators again (dropout masks)
            set_rng_state(rngs[0])
            if self.d.rank:
                torch.manual_seed(self.cfg.train.seed + self.d.rank)
        return TrainState.from_dict(saved)

    def load(self, path: Path) -> TrainState:
        """Back to a checkpoint of this run, in process: weights, optimizer, RNG and TrainState. The loader stays
        where it is, past the windows read since."""
        position = self.loader.state_dict()
        set_model_state(self.model, load_file(path / WEIGHTS), self.fsdp)
        state = self.restore(load_training_state(path))
        self.loader.load_state_dict(position)
        return state

    def weights_finite(self) -> bool:
        """Every weight finite (on every rank: under FSDP each holds a shard)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]  # FSDP2: own shard
        finite = torch.stack([torch.isfinite(p).all() for p in local]).all().float()
        if self.d.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def healthy(self, state: TrainState) -> bool:
        """Weights that may be written as a checkpoint: outside a streak of bad steps, and finite."""
        return state.bad_steps == 0 and self.weights_finite()

    def _progress(self, state: TrainState, **extra) -> dict:
        return {"step": state.step, "tokens": state.tokens, **extra, **self.record}

    def save_best(self, state: TrainState, val_loss: float) -> None:
        weights = full_state(self.model, None, self.fsdp)[0]  # every rank takes part under FSDP
        if self.d.main:
            progress = self._progress(state, val_loss=val_loss)
            write_dir_atomic(self.root / "best", lambda tmp: save_weights(weights, self.cfg, tmp, **progress))

    def save(self, state: TrainState) -> Path:
        """A training checkpoint of this step (weights, optimizer, loader, RNG of every rank, state); the oldest
        beyond keep_checkpoints are pruned. Callers check `healthy()` first."""
        d = self.d
        weights, optim = full_state(self.model, self.optimizer, self.fsdp)
        rngs = [rng_state()]
        if d.world_size > 1:
            gathered = [None] * d.world_size if d.main else None
            dist.gather_object(rngs[0], gathered, dst=0)
            rngs = gathered
        target = self.root / step_dir_name(state.step)
        if d.main:
            progress = self._progress(state)
            saved = {
                **progress,
                **state.to_dict(),
                "optimizer": optim,
                "loader": self.loader.state_dict(),
                "rng": rngs,
                "optimizer_name": self.optimizer_name,
            }

            def write(tmp: Path) -> None:
                save_weights(weights, self.cfg, tmp, **progress)
                save_training_state(saved, tmp)

            write_dir_atomic(target, write)
            prune_checkpoints(self.root, self.cfg.train.keep_checkpoints)
        if d.world_size > 1:
            dist.barrier()
        return target

    def save_if_healthy(self, state: TrainState) -> Path | None:
        """`save`, or None (postponed to the next healthy step) during a streak of bad steps or with
        non-finite weights: a checkpoint is always one that training can continue from."""
        if self.healthy(state):
            self.pending = False
            return self.save(state)
        if not self.pending:
            self.log.info(f"step {state.step:,}: checkpoint postponed until the bad steps end")
        self.pending = True
        return None
