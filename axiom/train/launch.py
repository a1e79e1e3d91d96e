"""Start or continue a run: `train` checks it against its data and directory, builds or loads the model and runs
the loop of axiom/train/trainer.py; the schedule and optimizer are in axiom/train/optim.py. What a run writes into
its folder (config.json, train.log, the csvs, checkpoints/, best/) is listed once, in docs/training.md ("Outputs").
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from axiom.config import Config, TrainConfig, changed_fields
from axiom.data.loader import read_manifest
from axiom.errors import AxiomError
from axiom.files import (
    check_no_overlap,
    describe_missing,
    output_lock,
    read_json,
    remove_contents,
    write_errors,
    write_json_atomic,
)
from axiom.model.checkpoint import (
    CHECKSUMS,
    CONFIG,
    STATE,
    WEIGHTS,
    check_training_state,
    clean_stale_checkpoints,
    config_of,
    load_model,
    load_training_state,
    newest_valid_checkpoint,
    read_meta,
    step_dir_name,
    verify_checkpoint,
)
from axiom.model.fused_loss import check_loss_kernel
from axiom.model.transformer import Axiom
from axiom.runtime import pick_device
from axiom.train.checkpointer import DATA_IDENTITY, data_record, recorded_best, set_aside_newer
from axiom.train.optim import schedule_jump
from axiom.train.parallel import Dist, from_main, init_distributed, set_model_state
from axiom.train.plan import plan_here
from axiom.train.recovery import rewind_logs
from axiom.train.runlog import RunLog
from axiom.train.trainer import Trainer, TrainResult

STARTED_FROM = "started_from.json"

# Reads the weights of --init-from when it is not an Axiom checkpoint (`axiom train` passes the Hugging Face folder
# reader of axiom.interop); the model's shape is then the run's config.
WeightsReader = Callable[[Path], dict[str, torch.Tensor]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    cfg: Config,
    data_dir: str | Path,
    run_dir: str | Path,
    resume: bool = False,
    device: str | None = None,
    tensorboard: bool = False,
    wandb_project: str | None = None,
    init_from: str | Path | None = None,
    resume_from: str | Path | None = None,
    read_weights: WeightsReader | None = None,
) -> TrainResult:
    """Train `cfg` on a prepared data directory into `run_dir`.

    `resume`: continue the newest checkpoint of `run_dir`, or start fresh if it has none yet (so one command line
    can be re-run after any preemption); the model's shape comes from the checkpoint, training fields from `cfg`.
    `resume_from`: continue this training checkpoint instead (newer ones of the run are moved aside).
    `init_from`: a new run (step 0, fresh optimizer) from the weights of a checkpoint, or of another folder that
    `read_weights` reads (a Hugging Face folder, say) into a model of `cfg.model`."""
    d = init_distributed()
    try:
        run_dir, data_dir = Path(run_dir), Path(data_dir)
        inputs = [("--data", data_dir), ("--init-from", init_from), *(("eval_tasks", f) for f in cfg.train.task_files)]
        check_no_overlap(run_dir, inputs)
        log_to = {"tensorboard": tensorboard, "wandb_project": wandb_project}
        device = pick_device(device, d.local_rank, d.local_world_size)
        with contextlib.ExitStack() as held:
            if d.main:  # one writer per run directory; a full disk or read-only target is one line
                held.enter_context(write_errors(run_dir, "the checkpoints written so far are intact; then --resume"))
                held.enter_context(output_lock(run_dir, "train"))
            trainer = setup(cfg, data_dir, run_dir, resume, device, d, init_from, resume_from, log_to, read_weights)
            return trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_run_config(cfg: Config, device: torch.device, d: Dist) -> None:
    """The checks between a run's config, its device and its processes."""
    t = cfg.train
    cfg.check_context()
    if device.type == "cuda" and t.dtype == "float16":
        raise AxiomError("train config: dtype=float16 needs loss scaling, which axiom train does not do; use bfloat16")
    if t.grad_accum_steps % d.world_size:
        raise AxiomError(uneven_split(t, d.world_size))
    check_loss_kernel(t.loss_kernel, device)


def uneven_split(t: TrainConfig, world_size: int) -> str:
    """Why `t`'s accumulation does not split over `world_size` processes, and the way on. A checkpoint records the
    split its plan chose for its own process count (auto's 4 x 1 on one process), so the way to resume it on
    another count is to let the plan split the same sequences again."""
    problem = f"train config: grad_accum_steps={t.grad_accum_steps} is not divisible by the {world_size} processes"
    sequences = t.sequences_per_step
    if sequences % world_size:  # (always, with an auto micro-batch: grad_accum_steps counts the sequences)
        return (
            f"{problem}, nor are the step's {sequences} sequences; run on a process count that divides {sequences}, "
            "or change the step (grad_accum_steps: tokens per step change)"
        )
    return (
        f"{problem}; to keep the step's {sequences} sequences: --set micro_batch_size=auto --set "
        f"grad_accum_steps={sequences} (the plan splits them into micro-batches for each process)"
    )


def find_start(
    run_dir: Path, resume: bool, resume_from: str | Path | None, init_from: str | Path | None = None
) -> tuple[Path | None, list[tuple[Path, str]], bool]:
    """The checkpoint a run continues from (None: a fresh start), the newer ones --resume skipped as unverifiable,
    and whether `run_dir` already holds files; refuses a fresh start into a used directory, a start again from other
    weights than the run began from, and another run's checkpoint into it."""
    skipped: list[tuple[Path, str]] = []
    if run_dir.exists() and not run_dir.is_dir():
        raise AxiomError(f"--out {run_dir} {describe_missing(run_dir)}, not a folder; choose a folder for the run")
    if resume_from is not None:
        start = Path(resume_from)
        check_resume_from_folder(start)
        verify_checkpoint(start, need_state=True)
    elif resume:
        start, skipped = newest_valid_checkpoint(run_dir / "checkpoints")
        if start is None and skipped:  # hours of training, not a run killed before its first checkpoint
            raise AxiomError(no_checkpoint_verifies(run_dir, skipped))
    else:
        start = None
    used = run_dir.is_dir() and any(run_dir.iterdir())
    if start is None and used and not resume:
        raise AxiomError(f"{run_dir} already holds a run; pass --resume to continue it, or choose a new --out")
    if start is None and used:
        check_holds_a_run(run_dir)
        check_same_start(run_dir, init_from)
    if start is not None and used and not start.resolve().is_relative_to((run_dir / "checkpoints").resolve()):
        raise AxiomError(f"--resume-from {start}: not a checkpoint of {run_dir}; continue it into an empty --out")
    return start, skipped, used


def no_checkpoint_verifies(run_dir: Path, skipped: list[tuple[Path, str]]) -> str:
    """Why --resume does not start a run whose every checkpoint fails to verify afresh, and the ways on."""
    newest, reason = skipped[0]
    best = run_dir / "checkpoints" / "best"
    weights = best if best.is_dir() else newest
    return (
        f"--resume: none of the {len(skipped)} checkpoints of {run_dir} verifies (the newest, {newest.name}: "
        f"{reason}); nothing was changed: restore one and --resume again, start a new run from weights with "
        f"--init-from {weights} and a new --out, or move {run_dir} away to start this run again"
    )


def check_same_data(start: Path, meta: dict, data_dir: Path, manifest: dict) -> None:
    """Refuse to continue checkpoint `start` (`meta`: its config.json) on other data than it trained on (prepared
    again from an edited source, or split otherwise): the loader's position counts windows of that data. A
    checkpoint that records no data (an older axiom's) is not checked."""
    saved = meta.get("data")
    if not isinstance(saved, dict):
        return
    now = data_record(data_dir, manifest)
    differ = [k for k in DATA_IDENTITY if k in saved and saved[k] != now[k]]
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in differ]
    if changed:
        raise AxiomError(
            f"{data_dir} is not the data {start} was trained on ({', '.join(changed)}); continue on that data, "
            f"or start a new run (a new --out) from its weights with --init-from {start}"
        )


def with_data_split(cfg: Config, manifest: dict) -> tuple[Config, str | None]:
    """`cfg` recording the split its data was made with (axiom prepare's --val-fraction and --split-seed: the config's
    own values split nothing in training), and a line saying so where they differed."""
    split = {k: manifest.get("split", {}).get(k) for k in ("val_fraction", "split_seed")}
    asked = {k: getattr(cfg.train, k) for k in split}
    fraction, seed = split.values()
    if asked == split or not (isinstance(fraction, float) and 0 < fraction < 1 and isinstance(seed, int)):
        return cfg, None  # (an empty split fails later, with its own message; data written otherwise has none)
    note = (
        f"data split: val_fraction {split['val_fraction']:g}, split_seed {split['split_seed']}, as axiom prepare "
        f"split the data (recorded in config.json in place of the config's "
        f"{', '.join(f'{k} {v:g}' for k, v in asked.items() if v != split[k])}, which only axiom prepare reads)"
    )
    return Config(cfg.model, dataclasses.replace(cfg.train, **split)), note


def check_holds_a_run(run_dir: Path) -> None:
    """--resume found no checkpoint in the used folder `run_dir`, so a fresh run would start there, over its
    config.json and csvs: refuse, in one line, a folder that is a checkpoint or holds another program's config.json."""
    if any((run_dir / name).exists() for name in (WEIGHTS, CHECKSUMS, STATE)):
        raise AxiomError(
            f"--out {run_dir} is a checkpoint, not a run's folder; --resume-from {run_dir} continues from it into "
            f"its own run's --out, --init-from {run_dir} starts a new run (a new --out) from its weights"
        )
    other = f"--out {run_dir} holds files but no run of axiom train; nothing was written: choose an empty or new --out"
    config = run_dir / "config.json"  # what a fresh run would write over (beside a scheduler's log, say: fine)
    if config.is_file() and not {"model", "train"} <= read_json(config, other).keys():
        raise AxiomError(f"{other} (its config.json is not a run's)")


def started_from(init_from: str | Path | None) -> str | None:
    """What started_from.json records of --init-from: its absolute path, or None for new weights."""
    return str(Path(init_from).resolve()) if init_from is not None else None


def check_same_start(run_dir: Path, init_from: str | Path | None) -> None:
    """--resume found no checkpoint, so the run starts again: from the weights it began from, not others (unless
    those are no longer there: moved, they are taken from where --init-from names them now). A fine-tune killed
    before its first checkpoint would otherwise start again from random weights under `--resume` alone."""
    path = run_dir / STARTED_FROM
    began = read_json(path, "delete it to start the run afresh").get("init_from") if path.is_file() else None
    given = started_from(init_from)
    if began is None or given == began or (given is not None and not Path(began).exists()):  # moved: as given now
        return
    there = Path(began).exists()
    raise AxiomError(
        f"--resume: {run_dir} has no complete checkpoint yet and began from --init-from {began}"
        + ("" if there else ", which is no longer there")
        + f"; pass --init-from {began if there else 'ITS_NEW_PATH'} --resume to start it again from those weights"
        + f" (or delete {path} to start it from others)"
    )


def check_resume_from_folder(path: Path) -> None:
    """Refuse in one line, with what to pass instead, a folder that is whole but not a training checkpoint: a run
    directory, or weights without training state (best/, an import), as opposed to a damaged step checkpoint."""
    if (path / "checkpoints").is_dir():
        raise AxiomError(
            f"--resume-from {path}: a run directory, not a checkpoint; --resume continues its newest checkpoint, "
            f"--resume-from {path / 'checkpoints'}/step_N a chosen one"
        )
    if (path / STATE).exists() or not (path / WEIGHTS).is_file() or _lists_state(path):
        return
    step = read_meta(path).get("step")
    same = path.parent / step_dir_name(step) if isinstance(step, int) else None
    instead = (
        f"--resume-from {same} continues from the same step"
        if same is not None and same.is_dir()
        else f"--init-from {path} starts a new run (a new --out) from its weights"
    )
    raise AxiomError(
        f"--resume-from {path}: weights without training state (no {STATE}: optimizer, loader position, RNG), so "
        f"training cannot continue from it; {instead}"
    )


def _lists_state(path: Path) -> bool:
    """Whether a checkpoint's checksums.json lists state.pt: one written with training state that lost it."""
    checksums = path / CHECKSUMS
    files = read_json(checksums, "the checkpoint is damaged").get("files") if checksums.is_file() else None
    return isinstance(files, dict) and STATE in files


def initial_model(
    cfg: Config, start: Path | None, init_from: str | Path | None, read_weights: WeightsReader | None
) -> Axiom:
    """The model a run starts with: its checkpoint's when continuing, else --init-from's weights, else a new one."""
    if start is not None:
        return load_model(start, "cpu")[0]
    if init_from is None:
        return Axiom(cfg.model)
    if read_weights is None:
        return load_model(Path(init_from), "cpu")[0]
    model = Axiom(cfg.model)
    set_model_state(model, read_weights(Path(init_from)), fsdp=False)
    return model


def setup(
    cfg: Config,
    data_dir: Path,
    run_dir: Path,
    resume: bool,
    device: torch.device,
    d: Dist,
    init_from: str | Path | None = None,
    resume_from: str | Path | None = None,
    log_to: dict | None = None,
    read_weights: WeightsReader | None = None,
) -> Trainer:
    """Check the run against its data and directory, plan it for the device (the settings left to auto), build or
    load the model, and return its Trainer."""
    manifest = read_manifest(data_dir)
    check_run_config(cfg, device, d)
    cfg, plan, fallback = plan_here(cfg, device, d.world_size, cfg.train.fsdp and d.world_size > 1)
    cfg, split_note = with_data_split(plan.applied(cfg), manifest)
    notes = clean_stale_checkpoints(run_dir / "checkpoints") if d.main else []  # a kill's leftovers, under the lock
    start, skipped, used = from_main(d, lambda: find_start(run_dir, resume, resume_from, init_from))
    state = meta = None
    if start is not None:
        state = load_training_state(start)  # first: a bad state.pt is refused early
        check_training_state(state, start)
        meta = read_meta(start)  # its config.json, read once: the data it trained on, its training fields
        check_same_data(start, meta, data_dir, manifest)
    if d.world_size > 1:
        dist.barrier()  # every rank has judged the directory before rank 0 writes into it
    created = not run_dir.exists()
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        log = RunLog(run_dir, d.main, **(log_to or {}), continuing=start is not None)
        for line in notes:
            log.info(f"cleaned up: {line}")
        if fallback:
            log.notice(fallback)
        for path, reason in skipped:
            log.info(f"--resume: skipped {path}, which does not verify ({reason})")
        if split_note:
            log.info(split_note)
        seed_everything(cfg.train.seed)
        model = initial_model(cfg, start, init_from, read_weights)  # alike on every rank: FSDP does not broadcast it
        if d.world_size > 1:
            seed_everything(cfg.train.seed + d.rank)  # each rank its own dropout masks (nanoGPT's seed + rank)
        trainer = Trainer(cfg, plan, data_dir, manifest, run_dir, model, device, d, log, state)
    except BaseException:
        if d.main and not used:  # a new run that could not start leaves its folder as it found it: empty or absent
            remove_contents(run_dir, created)
        raise
    if d.main:  # after the Trainer's checks: a refused resume leaves the run's config.json as it was
        write_json_atomic(run_dir / "config.json", cfg.to_dict())
        if start is None:  # what a fresh start began from, for a --resume before the first checkpoint
            write_json_atomic(run_dir / STARTED_FROM, {"init_from": started_from(init_from)})
    step = trainer.state.step
    best = from_main(d, lambda: recorded_best(run_dir / "checkpoints")) if start is not None else None
    if best is not None and best[1] < trainer.state.best_val_loss:  # written after the checkpoint: kept until beaten
        trainer.state.best_val_loss = best[1]
        log.info(f"best/ (step {best[0]:,}, val loss {best[1]:.4f}) stays until an evaluation is lower")
    if d.main and start is not None:  # the ones skipped too: training would overwrite them
        set_aside_newer(run_dir / "checkpoints", step, log)
    if start is not None:
        rewind_logs(log, trainer.state)
        log.info(f"resumed from {start} at step {step:,} ({trainer.state.tokens:,} tokens)")
        if init_from is not None:
            log.info(f"--init-from {init_from}: not read, the run continues its checkpoint (it began from it)")
        log_resume_changes(log, config_of(meta, start / CONFIG).train, cfg.train, step)
    elif used:
        rewind_logs(log, None)
        weights = f"the weights of {init_from}" if init_from is not None else "new weights"
        log.info(f"--resume: {run_dir} has no complete checkpoint yet; starting fresh from {weights}")
    elif init_from is not None:
        log.info(f"--init-from {init_from}: a new run from its weights, at step 0 with a fresh optimizer")
    trainer.log_plan()
    return trainer


def log_resume_changes(log: RunLog, saved: TrainConfig, cfg: TrainConfig, step: int) -> None:
    """Name the training fields changed since the checkpoint (whose were `saved`), and as a notice an LR that jumps
    or a run shortened to before the checkpoint's step."""
    changed = changed_fields(saved, cfg)
    if changed:
        log.info(f"--resume: training fields changed from the checkpoint's: {', '.join(changed)}")
    if step > cfg.steps:
        log.notice(f"the checkpoint is at step {step:,}, past the run's {cfg.steps:,} steps: nothing to train")
    elif step < cfg.steps and (jump := schedule_jump(saved, cfg, step)) is not None:
        log.notice(jump)
