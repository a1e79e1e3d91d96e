"""Checkpoint directories: weights in safetensors, the resolved config and progress in config.json.

    CKPT/model.safetensors   weights; a tied table is stored once, as embed.weight (axiom.model.transformer)
    CKPT/config.json         {"model": ModelConfig, "train": TrainConfig, "step", "tokens", "axiom_version"}
    CKPT/state.pt            training checkpoints only: optimizer, loader position, RNG states, counters
    CKPT/checksums.json      size and SHA-256 of every file above, written inside the atomic write

Loading never unpickles code: safetensors for weights, JSON for the rest, and state.pt (tensors and plain
Python values only) through torch.load(weights_only=True). Loading checks the content hashes where present, the
tensor names and shapes against config.json, and that every weight is finite; each failure is one line.

Training checkpoints live in RUN/checkpoints/step_NNNNNN (the newest `keep_checkpoints`) and RUN/checkpoints/best.
For resume, `newest_valid_checkpoint` returns the newest one that verifies and the newer ones it skipped, with
reasons; `prune_checkpoints` renames old ones aside before deleting them, and `clean_stale_checkpoints` removes
what a kill left behind (call it at the start of a run, under the run's lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from axiom import __version__
from axiom.config import Config, ModelConfig, is_hf_config
from axiom.errors import AxiomError
from axiom.files import (
    atomic_dir,
    describe_missing,
    file_mode,
    os_error_in,
    read_json,
    remove_path,
    restore_dir,
    temp_owner,
    write_errors,
)
from axiom.model.transformer import Axiom, retie, rope_tables, tie, untie

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.pt"
CHECKSUMS = "checksums.json"
STEP_DIR = re.compile(r"step_(\d+)")


def stored_tensors(model: Axiom) -> dict[str, torch.Tensor]:
    """The state dict as saved: a tied output table is left out (it is embed.weight; `untie`)."""
    return untie(model.state_dict(), model.cfg.tie_embeddings)


# ---- finite weights


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """(name, count of NaN/inf values) of the first floating tensor that is not all finite, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name, int((~torch.isfinite(t)).sum())
    return None


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """AxiomError naming the first tensor with NaN or inf values; used before weights are written or used."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise AxiomError(
            f"{where}: {bad[0]} holds {bad[1]:,} non-finite values (NaN or inf); these weights are unusable "
            "(from a diverged run?)"
        )


# ---- writing


def save_weights(state_dict: dict[str, torch.Tensor], cfg: Config, directory: str | Path, **progress) -> None:
    """Write the weights of `state_dict` (a model's, or one gathered from FSDP shards) and config.json into
    `directory` (which must exist); `progress`: step, tokens, .... Non-finite weights are refused. A full disk
    raises OSError (ENOSPC), which `write_errors` turns into one line."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in untie(state_dict, cfg.model.tie_embeddings).items()}
    check_finite(state, f"{directory / WEIGHTS}: refusing to write")
    save_safetensors(state, directory / WEIGHTS)
    meta = {**cfg.to_dict(), **progress, "axiom_version": __version__}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with a failed write (full disk, ...) raised as the OSError it is, so that
    `write_errors` reports it in one line (safetensors puts the OS error only in its message). The file gets the
    mode of every other file we write (the umask's), not safetensors' own 0o600."""
    try:
        save_file(state, path, metadata=metadata)
    except Exception as e:
        os_error = os_error_in(e)
        if os_error is None:
            raise
        raise OSError(os_error.errno, os_error.strerror, str(path)) from None
    os.chmod(path, file_mode())


def save_training_state(state: dict, directory: str | Path) -> None:
    """`state` must hold only tensors and plain Python values, so that weights_only loading accepts it."""
    try:
        with open(Path(directory) / STATE, "wb", buffering=0) as f:
            torch.save(state, _WholeWrites(f))
    except RuntimeError as e:  # torch's zip writer fails again on closing and hides the OSError behind this
        if isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise


class _WholeWrites:
    """A file for torch.save whose `write` writes everything or raises OSError: given a path (or a buffered file)
    torch reports a full disk only as "RuntimeError ... unexpected pos"."""

    def __init__(self, raw) -> None:
        self.raw = raw

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += self.raw.write(view[done:])  # a full disk raises OSError here
        return done

    def flush(self) -> None:
        pass


def write_checksums(directory: str | Path) -> dict:
    """Hash every file of `directory` into checksums.json (inside the atomic write, before the rename)."""
    directory = Path(directory)
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != CHECKSUMS and not p.name.startswith(".")
    }
    record = {"algorithm": "sha256", "files": files}
    (directory / CHECKSUMS).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_dir_atomic(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Write the checkpoint folder `final` through `atomic_dir`: `write(tmp_dir)` fills it, checksums.json hashes its
    files, and one rename makes it visible, so a kill at any moment leaves either the old folder or the new one
    complete. A full disk or read-only target is one AxiomError, with the temporary folder removed."""
    final = Path(final)
    then = "the folder was not replaced and earlier checkpoints are intact; free space and resume"
    with write_errors(final, then), atomic_dir(final) as tmp:
        write(tmp)
        write_checksums(tmp)
    return final


# ---- reading and verifying


def read_meta(directory: str | Path) -> dict:
    """config.json of a checkpoint, as a dict (one AxiomError if it is missing or not JSON)."""
    directory = Path(directory)
    if not directory.exists():  # a mistyped path, or a step checkpoint a run pruned meanwhile
        raise AxiomError(
            f"checkpoint: {directory} {describe_missing(directory)}; pass a checkpoint directory written by axiom "
            "train (a run keeps best/ and its newest keep_checkpoints step_N)"
        )
    if not directory.is_dir():
        raise AxiomError(f"checkpoint: {directory} {describe_missing(directory)}, not a checkpoint folder")
    if (directory / "checkpoints").is_dir() and not (directory / WEIGHTS).exists():  # its config.json is the run's
        raise AxiomError(
            f"checkpoint: {directory} is a run's folder, not a checkpoint; pass one of its checkpoints: "
            f"{directory / 'checkpoints' / 'best'} (the lowest val loss) or {directory / 'checkpoints'}/step_N"
        )
    path = directory / CONFIG
    if not path.is_file():
        what = "not found" if not path.exists() else describe_missing(path)
        raise AxiomError(f"checkpoint: {path} {what}; pass a checkpoint directory written by axiom train")
    return read_json(path, "pass a checkpoint directory written by axiom train")


def config_of(meta: dict, path: Path) -> Config:
    """The Config stored in a checkpoint's config.json, or one AxiomError naming the file."""
    if is_hf_config(meta):
        raise AxiomError(
            f"checkpoint: {path.parent} is a Hugging Face model folder, not an Axiom checkpoint; convert it first: "
            f"axiom import --hf {path.parent} --out CKPT"
        )
    try:
        return Config.from_dict(meta)
    except (KeyError, TypeError, AxiomError) as e:
        raise AxiomError(f"checkpoint: {path} has no valid model/train config ({e})") from None


def _check_hashes(directory: Path, names: list[str]) -> bool:
    """Compare `names` with checksums.json; False when the checkpoint has none (written before hashes were)."""
    if not (directory / CHECKSUMS).is_file():
        return False
    record = read_json(directory / CHECKSUMS, "the checkpoint is damaged: use another one")
    files = record.get("files")
    if not isinstance(files, dict):
        raise AxiomError(f"{directory / CHECKSUMS}: no 'files' table; the checkpoint is damaged: use another one")
    for name in names:
        path, want = directory / name, files.get(name)
        if not isinstance(want, dict):
            raise AxiomError(f"{path}: not listed in {CHECKSUMS}; the checkpoint is damaged: use another one")
        if not path.is_file():
            raise AxiomError(f"{path}: {describe_missing(path)} (listed in {CHECKSUMS}); use another checkpoint")
        size = path.stat().st_size
        if size != want.get("size"):
            raise AxiomError(f"{path}: {size:,} bytes, {CHECKSUMS} records {want.get('size')}; use another checkpoint")
        if _sha256(path) != want.get("sha256"):
            raise AxiomError(
                f"{path}: content differs from its SHA-256 in {CHECKSUMS} (corrupt); use another checkpoint"
            )
    return True


def _check_safetensors(path: Path) -> None:
    if not path.is_file():
        raise AxiomError(f"checkpoint: {path} {'not found' if not path.exists() else describe_missing(path)}")
    try:
        with safe_open(path, "pt"):
            pass
    except Exception as e:  # SafetensorError for a truncated, empty or foreign file
        raise AxiomError(f"{path}: not a readable safetensors file ({e}); use another checkpoint") from None


def verify_checkpoint(directory: str | Path, need_state: bool = False) -> Config:
    """Check a checkpoint without building a model; returns its Config, or raises one AxiomError naming the problem.

    With checksums.json: every listed file must have its recorded size and SHA-256. Without (older checkpoints):
    the safetensors header must cover the file and state.pt must be an intact zip (CRC of every member).
    `need_state`: a training checkpoint, which must also hold state.pt."""
    directory = Path(directory)
    meta = read_meta(directory)  # a missing folder, a run's folder, no config.json: each its own line
    names = [CONFIG, WEIGHTS] + ([STATE] if need_state else [])
    hashed = _check_hashes(directory, names)
    cfg = config_of(meta, directory / CONFIG)
    _check_safetensors(directory / WEIGHTS)
    if need_state and not hashed:
        path = directory / STATE
        if not path.is_file():
            raise AxiomError(f"checkpoint: {path} {describe_missing(path)}")
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise AxiomError(f"{path}: not a readable training state ({e})") from None
        if bad is not None:
            raise AxiomError(f"{path}: member {bad} is corrupt (CRC mismatch)")
    return cfg


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Axiom, Config, dict]:
    """Build the model a checkpoint describes and load its weights; returns (model, config, metadata).

    Refused in one line: a missing or unreadable file, a content hash mismatch, tensors that do not fit the config,
    and weights that are not all finite."""
    directory = Path(directory)
    cfg = verify_checkpoint(directory)
    meta = read_meta(directory)
    weights = directory / WEIGHTS
    with torch.device("meta"):
        model = Axiom(cfg.model)
    try:
        state = load_file(weights, device=str(device))
    except Exception as e:  # SafetensorError, or a device error
        raise AxiomError(f"{weights}: cannot be loaded ({e})") from None
    check_tensors(state, stored_tensors(model), f"checkpoint: {weights}")
    check_finite(state, f"checkpoint: {weights}")
    model.load_state_dict(retie(state, cfg.model.tie_embeddings), assign=True)
    tie(model)  # assign=True put two Parameters in place
    # RoPE tables are not stored: rebuild them on the target device.
    cos, sin = rope_tables(cfg.model.head_dim, cfg.model.max_seq_len, cfg.model.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model, cfg, meta


def check_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """One AxiomError naming what differs between `found` and the `expected` tensors of the folder's config.json:
    missing, unexpected or misshapen tensors, or a tensor that is not floating point (WEIGHT_DTYPES)."""
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise AxiomError(
            f"{where}: weights do not match {CONFIG}: missing [{_first(missing)}], unexpected [{_first(unexpected)}]"
        )
    for name, tensor in found.items():
        if tensor.shape != expected[name].shape:
            raise AxiomError(
                f"{where}: {name} has shape {tuple(tensor.shape)} but {CONFIG} implies {tuple(expected[name].shape)}"
            )
        if tensor.dtype not in WEIGHT_DTYPES:
            kinds = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_DTYPES)
            raise AxiomError(f"{where}: {name} holds {str(tensor.dtype).removeprefix('torch.')}; weights are {kinds}")


# What stored weights may hold: floating point that a float32 copy represents (float8 and integers do not).
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _first(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def expected_tensors(m: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors (on the meta device: names and shapes only) that a checkpoint of `m` stores."""
    with torch.device("meta"):
        return stored_tensors(Axiom(m))


# ---- training checkpoints: RUN/checkpoints/step_000200/{model.safetensors, config.json, state.pt, checksums.json}


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def run_dir_of(ckpt: str | Path) -> Path | None:
    """The run a checkpoint belongs to (RUN for RUN/checkpoints/NAME), or None for a standalone checkpoint."""
    ckpt = Path(os.path.realpath(ckpt))
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def load_training_state(directory: str | Path) -> dict:
    path = Path(directory) / STATE
    if not path.is_file():
        raise AxiomError(f"checkpoint: {path} not found; resume needs a checkpoint written by axiom train")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise AxiomError(
            f"checkpoint: {path} cannot be read ({type(e).__name__}); resume from an earlier checkpoint with "
            "--resume-from CKPT"
        ) from e


def check_training_state(state: object, directory: str | Path) -> None:
    """One AxiomError where a state.pt that loaded does not hold what axiom train writes: its optimizer state,
    loader position and RNG states (a file of another program's, or edited, made --resume fail with a traceback)."""
    shapes = {"optimizer": dict, "loader": dict, "rng": list, "step": int, "tokens": int}
    wrong = (
        [key for key, kind in shapes.items() if not isinstance(state.get(key), kind)]
        if isinstance(state, dict)
        else ["the whole file"]
    )
    if not wrong and not (state["rng"] and all(isinstance(r, dict) for r in state["rng"])):
        wrong = ["rng"]
    if wrong:
        raise AxiomError(
            f"checkpoint: {Path(directory) / STATE} is not a training state of axiom train ({', '.join(wrong)} "
            "missing or of another type); resume from another checkpoint with --resume-from CKPT"
        )


def rng_state() -> dict:
    """Python, NumPy and PyTorch (CPU and CUDA) generator states as tensors and plain values."""
    version, py_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), d) for d in root.iterdir() if (m := STEP_DIR.fullmatch(d.name)) and d.is_dir())


def list_checkpoints(root: str | Path, complete: bool = True) -> list[tuple[int, Path]]:
    """Complete step checkpoints under `root`, oldest first (temporary directories start with a dot); with
    `complete=False` also step folders that lack a file."""
    dirs = _step_dirs(Path(root))
    return [(s, d) for s, d in dirs if not complete or all((d / f).is_file() for f in (WEIGHTS, CONFIG, STATE))]


def newest_valid_checkpoint(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest step checkpoint under `root` that `verify_checkpoint(need_state=True)` accepts (None if none),
    and the newer ones it skipped, each with the reason, newest first; name them in the log when resuming."""
    skipped = []
    for _, d in reversed(_step_dirs(Path(root))):
        try:
            verify_checkpoint(d, need_state=True)
        except AxiomError as e:
            skipped.append((d, str(e)))
            continue
        return d, skipped
    return None, skipped


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete step checkpoints and remove every step folder older than them.

    Each is renamed to `.step_N.pruned` before it is deleted, so a kill never leaves a half-deleted folder that
    looks like a checkpoint; leftovers are removed on the next call (or by `clean_stale_checkpoints`)."""
    root = Path(root)
    clean_stale_checkpoints(root)
    complete = list_checkpoints(root)
    if keep < 1 or len(complete) <= keep:
        return
    oldest_kept = complete[-keep][0]
    for step, d in _step_dirs(root):  # incomplete folders older than the kept ones go too
        if step < oldest_kept:
            aside = d.with_name(f".{d.name}.pruned")
            os.replace(d, aside)
            shutil.rmtree(aside, ignore_errors=True)


def clean_stale_checkpoints(root: str | Path) -> list[str]:
    """Tidy what a kill left under `root` (RUN/checkpoints): half-pruned `.step_N.pruned` and unfinished
    `.NAME.tmp-PID` folders are removed (whatever the PID: the run's lock says no writer is left), and a `.NAME.old`
    left by an interrupted replacement is put back or removed. Call it under the run's lock; returns one line per
    action, for the log."""
    root = Path(root)
    done = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        if (p.name.startswith(".") and p.name.endswith(".pruned")) or temp_owner(p) is not None:
            remove_path(p)
            done.append(f"removed the unfinished {p}")
        elif p.name.startswith(".") and p.name.endswith(".old"):
            final = p.with_name(p.name[1:-4])
            existed = final.exists()
            restore_dir(final)
            done.append(f"removed the replaced {p}" if existed else f"restored {final} from {p}")
    return done
