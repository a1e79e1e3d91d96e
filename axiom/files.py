"""File safety shared by every command that writes: JSON read with one-line errors, atomic writes, and the rules
that keep a user's data safe from our outputs.

    check_no_overlap(out, inputs)     an output never is, contains or lies inside an input (symlinks resolved)
    write_marker / read_marker        `.axiom-output.json`: which command wrote a folder, and its files (so --force
                                      may replace it)
    check_replaceable(out, cmd, force) refuse a file, a non-empty folder without --force, with it a foreign folder
                                      or one holding files the command did not write
    output_lock(out, cmd, wait_s)     one writer per output: an exclusive flock, released on any exit
    write_errors(out, then)           a full disk, read-only or forbidden target as one line
    atomic_file / atomic_dir          every write goes through one: written under `.NAME.tmp-PID` beside the output,
                                      flushed, renamed when complete, removed on failure
    remove_stale_temps / restore_dir  temporaries of dead processes are removed; a folder replacement a kill
                                      interrupted is settled
    staged_output(out, cmd, force)    all of the above for an output folder replaced as a whole
    file_mode()                       the mode a new file gets under the process umask, for writers that use another
    member(folder, name, where)       a file named inside a manifest or index stays inside its folder

A command that writes the folder `out` from `inputs` does, before any slow work:

    out = check_replaceable(out, "export", force)
    check_no_overlap(out, {"--ckpt": ckpt, "the run of --ckpt": run})
    with staged_output(out, "export", force) as tmp:
        ... write into tmp

(a single file: `write_errors` and `output_lock` around `atomic_file`). docs/reliability.md has the why.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath

from axiom import __version__
from axiom.errors import AxiomError
from axiom.signals import sigterm_as_interrupt

try:
    import fcntl
except ImportError:  # Windows: output_lock falls back to its PID file
    fcntl = None

MARKER = ".axiom-output.json"


# The largest JSON file read (configs, manifests, checksums, states, a sharded model's index: kilobytes to a few
# megabytes); a larger one is no file of ours, and is not read whole into memory.
MAX_JSON_BYTES = 64 * 2**20


def read_json(path: Path, hint: str) -> dict:
    """The JSON object in `path`; anything else (not a regular file, over MAX_JSON_BYTES, invalid JSON, nested past
    the parser's depth, another JSON type) is an AxiomError ending with `hint`."""
    path = Path(path)
    try:
        found = path.stat()
        if not stat.S_ISREG(found.st_mode):  # a FIFO would block the read forever
            raise AxiomError(f"{path} {describe_missing(path)}, not a JSON file; {hint}")
        if found.st_size > MAX_JSON_BYTES:
            raise AxiomError(f"{path}: {found.st_size:,} bytes, too large for a JSON file of axiom's; {hint}")
        obj = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AxiomError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:120]}); {hint}") from None
    except OSError as e:
        raise AxiomError(f"{path}: cannot read ({e.strerror}); {hint}") from None
    if not isinstance(obj, dict):
        raise AxiomError(f"{path}: expected a JSON object; {hint}")
    return obj


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON through `atomic_file`, so a reader never sees half a file (nor a full disk's stub)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def describe_missing(path: Path) -> str:
    """Why `path` is not a readable regular file or folder, in a few words ("no such file or directory", ...)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"a broken symbolic link to {os.readlink(path)}" if path.is_symlink() else "no such file or directory"
    except OSError as e:
        return e.strerror or str(e)
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device"}
    kinds |= {stat.S_ISBLK: "a block device", stat.S_ISDIR: "a directory", stat.S_ISREG: "a regular file"}
    return "is " + next((name for test, name in kinds.items() if test(mode)), "not a regular file")


# ---- outputs never overlap inputs


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(path: Path) -> list[tuple[int, int]]:
    """Identities of `path` and of every folder above it, after resolving symbolic links (existing ones only)."""
    resolved = Path(os.path.realpath(path))
    return [i for i in map(_identity, (resolved, *resolved.parents)) if i is not None]


def check_no_overlap(
    out: str | Path,
    inputs: Mapping[str, str | Path | None] | Iterable[tuple[str, str | Path | None]],
) -> None:
    """Refuse an output (`--out`, in every command) that is, contains or lies inside any of `inputs`.

    `inputs` maps a label for the message (e.g. "--ckpt", "the run of --ckpt") to a path, or is a sequence of
    (label, path) pairs where labels repeat (e.g. ("the input", f) for every source file); None paths are
    skipped. Paths are compared by file identity (device and inode) after resolving symbolic links, so a symlink,
    a `..` detour, a bind mount or a case-insensitive spelling of the same folder is caught too. Inputs that do not
    exist cannot overlap anything and are ignored. Call it before any slow work and before taking the lock.
    """
    out = Path(out)
    out_chain = _chain(out)  # out itself (if it exists) and the folders above it
    out_id = _identity(Path(os.path.realpath(out)))
    for label, path in inputs.items() if isinstance(inputs, Mapping) else inputs:
        if path is None:
            continue
        path = Path(path)
        in_id = _identity(Path(os.path.realpath(path)))
        if in_id is None:
            continue
        if in_id == out_id:
            how = "is"
        elif in_id in out_chain:
            how = "lies inside"
        elif out_id is not None and out_id in _chain(path):
            how = "contains"
        else:
            continue
        raise AxiomError(
            f"--out {out} {how} {label} {path}: an output must not overlap an input; choose an --out outside it"
        )


# ---- markers: which command wrote a folder


def write_marker(directory: str | Path, command: str, **info) -> None:
    """Mark `directory` as written by `axiom COMMAND`, listing the files it holds (call it on the temporary folder,
    once it is complete and before the rename): --force later replaces only a folder that holds nothing else."""
    record = {"command": command, "axiom_version": __version__, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    record["files"] = [name for name in _entries(Path(directory)) if name != MARKER]
    (Path(directory) / MARKER).write_text(json.dumps({**record, **info}, indent=2) + "\n")


def read_marker(directory: str | Path) -> dict | None:
    """The marker of a folder written by an axiom command, or None (no marker, or not a readable one)."""
    try:
        obj = read_json(Path(directory) / MARKER, "")
    except AxiomError:
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("command"), str) else None


def _entries(directory: Path) -> list[str]:
    """What `directory` holds, as relative POSIX paths: files, links (not followed) and empty folders (`name/`)."""
    found = []
    for root, dirs, files in os.walk(directory):
        here = Path(root)
        names = [*files, *(d for d in dirs if (here / d).is_symlink())]
        found += [(here / name).relative_to(directory).as_posix() for name in names]
        if not dirs and not files and here != directory:
            found.append(here.relative_to(directory).as_posix() + "/")
    return sorted(found)


def check_replaceable(out: str | Path, command: str, force: bool) -> Path:
    """Refuse an `out` that `axiom COMMAND` must not replace; returns it as a Path.

    Absent or empty: fine. A file (or FIFO, ...): refused. A non-empty folder: refused without `force`; with
    `force`, replaced only if its marker says `axiom COMMAND` wrote it and it holds nothing but the files the marker
    lists, so that --force never deletes a run, a checkpoint, anything else that merely happens to be at that path,
    nor a file put into an earlier output since.
    """
    out = Path(os.path.normpath(out))  # "a/b/.." is "a": the new folder is named a, not ".."
    if Path(os.path.abspath(out)) in (Path.cwd(), *Path.cwd().parents):  # ".", "..", "x/..", "" alike
        raise AxiomError(
            f"--out {out}: the current folder or one above it; axiom {command} writes its output as a new folder "
            "that replaces the old one whole: name it, e.g. --out ./model"
        )
    if not out.exists() and not out.is_symlink():
        return out
    if os.path.ismount(out):  # a volume's root (docker's --out /output): the last step, a rename, fails with EBUSY
        raise AxiomError(
            f"--out {out} is a mount point; axiom {command} writes its output as a new folder that replaces the old "
            f"one whole, which a mount point cannot be: choose a folder inside it, e.g. --out {out / 'model'}"
        )
    if not out.is_dir():
        raise AxiomError(f"{out} exists and is {describe_missing(out).removeprefix('is ')}, not a folder")
    if not any(out.iterdir()):
        return out
    marker = read_marker(out)
    ours = marker is not None and marker["command"] == command
    if not force:
        hint = "pass --force to replace it" if ours else "choose another --out"
        raise AxiomError(f"{out} exists and is not empty; {hint}")
    if not ours:
        origin = f"it was written by axiom {marker['command']}" if marker else f"it holds no {MARKER}"
        raise AxiomError(
            f"{out}: --force replaces only a folder written by axiom {command}, and {origin}; it is left alone: "
            "choose another --out"
        )
    _check_only_ours(out, command, marker)
    return out


def _check_only_ours(out: Path, command: str, marker: dict) -> None:
    """Refuse a folder of `axiom COMMAND` that holds files its marker does not list (added since, e.g. by hand)."""
    written = marker.get("files")
    if not isinstance(written, list):
        raise AxiomError(
            f"{out}: its {MARKER} (axiom {marker.get('axiom_version', '?')}) does not list the files axiom {command} "
            "wrote, so --force cannot tell them from files added since; it is left alone: delete the folder yourself "
            "or choose another --out"
        )
    foreign = _foreign(_entries(out), written)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise AxiomError(
            f"{out}: --force replaces only what axiom {command} wrote, and the folder also holds {shown}; it is left "
            "alone: move those out of it, or choose another --out"
        )


def _foreign(entries: list[str], written: list) -> list[str]:
    """The entries that are not in `written` (nor the marker), a folder that holds nothing written as `NAME/`."""
    foreign = []
    for name in entries:
        if name == MARKER or name in written:
            continue
        top = name.split("/", 1)[0] + "/"
        if "/" in name and not any(isinstance(w, str) and w.startswith(top) for w in written):
            name = top  # e.g. a .git folder: named once, not file by file
        if name not in foreign:
            foreign.append(name)
    return foreign


# ---- one writer per output


def _lock_path(out: Path) -> Path:
    """`.NAME.lock` beside the real location of `out`, so that every spelling of it (a symlink, `..`) shares one."""
    real = Path(os.path.realpath(out))
    return real.parent / f".{real.name}.lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(lock: Path) -> dict:
    try:
        obj = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


class OutputBusy(AxiomError):
    """The output is locked by another live process (`output_lock`)."""


def _held_error(out: Path, command: str, lock: Path) -> OutputBusy:
    h = _holder(lock)
    who = (
        f"axiom {h.get('command', '?')} (pid {h.get('pid', '?')} on {h.get('host', '?')}, since {h.get('since', '?')})"
    )
    return OutputBusy(
        f"{out} is being written by {who if h else 'another process'}; wait for it to finish or stop it, "
        f"then run axiom {command} again (lock: {lock})"
    )


def _stale_pidfile(lock: Path) -> bool:
    h = _holder(lock)
    return h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int) and not pid_alive(h["pid"])


@contextlib.contextmanager
def output_lock(
    out: str | Path, command: str, wait_s: float = 0.0, on_wait: Callable[[dict], None] | None = None
) -> Iterator[Path]:
    """Hold `out` exclusively for `axiom COMMAND`; while another process holds it, wait up to `wait_s` seconds
    (calling `on_wait(holder)` once, holder as in the lock file: command, pid, host, since), then fail with an
    OutputBusy (an AxiomError) naming the holder.

    The lock is `flock` on `.NAME.lock` beside `out` (beside, so it also covers an output that is replaced by a
    rename, and exists before `out` does). flock because the kernel releases it on any exit, kill -9 and OOM
    included, so a lock is never stale and no PID can be mistaken for ours after reuse; the file holds our PID,
    host and start time only to name us in the other writer's message, and is removed on release. Where the
    filesystem has no flock (some network mounts) the file is created exclusively instead and counts as stale
    once its PID is gone from this host. While held, SIGTERM unwinds like Ctrl-C (KeyboardInterrupt), so the
    command's own cleanup runs.
    """
    out = Path(out)
    blocked = next((p for p in reversed(out.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise AxiomError(f"{out}: cannot write ({blocked} {describe_missing(blocked)}, not a folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while (fd := _try_lock(lock)) is None:
        if time.monotonic() >= deadline:
            raise _held_error(out, command, lock)
        if on_wait is not None:
            on_wait(_holder(lock))
            on_wait = None
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
    info = {"command": command, "pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%H:%M:%S")}
    try:  # a failed write of our name (a full disk) releases the lock too: a leaked descriptor would hold it
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        with sigterm_as_interrupt():
            yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _try_lock(lock: Path) -> int | None:
    """The locked file's descriptor, or None while another process holds it."""
    while True:
        if fcntl is None:
            return _try_pidfile(lock)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS...: no flock on this filesystem
            os.close(fd)
            return None if e.errno in (errno.EACCES, errno.EAGAIN) else _try_pidfile(lock)
        # A holder removes the file just before releasing it: if we locked a file that is no longer at the path,
        # someone else may be locking the new one; start over.
        if _identity(lock) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            return fd
        os.close(fd)


def _try_pidfile(lock: Path) -> int | None:
    """The fallback without flock: create the lock file exclusively; a leftover of a dead local PID is removed."""
    for _ in range(2):
        try:
            return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if not _stale_pidfile(lock):
                return None
            lock.unlink(missing_ok=True)
    return None


# ---- failed writes as one line

WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large",
    errno.EIO: "input/output error",
    errno.ENOTDIR: "a path component is not a folder",
    errno.EISDIR: "is a folder",
    errno.ENAMETOOLONG: "file name too long",
}


@contextlib.contextmanager
def write_errors(out: str | Path, then: str) -> Iterator[None]:
    """Turn a write that failed for a reason outside the program (full disk, read-only target, permissions) into
    one AxiomError: `OUT: cannot write FILE (no space left on the device); THEN`. `then` says what happened to
    the user's data and what to do, e.g. "nothing was replaced; free space and run the command again"."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename and str(e.filename) != str(out) else ""
        raise AxiomError(f"{out}: cannot write{where} ({WRITE_ERRNOS[e.errno]}); {then}") from None


def os_error_in(e: Exception) -> OSError | None:
    """The OSError that a library reported only in its message, e.g. safetensors' "... (os error 28)"."""
    text = str(e)
    mark = text.rfind("(os error ")
    if mark < 0:
        return None
    code = text[mark + 10 :].split(")", 1)[0]
    return OSError(int(code), os.strerror(int(code))) if code.isdigit() else None


# ---- atomic writes: one temporary name beside the output, renamed when complete

TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)")  # `.NAME.tmp-PID`


def _temp_path(final: Path) -> Path:
    """`.NAME.tmp-PID` beside `final`: this process's temporary, hidden, recognisable as stale once PID is gone."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def temp_owner(path: Path) -> tuple[str, int] | None:
    """(NAME, PID) of a temporary `.NAME.tmp-PID` that `atomic_file` or `atomic_dir` made, else None."""
    m = TEMP_NAME.fullmatch(path.name)
    return (m["name"], int(m["pid"])) if m else None


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove the temporaries of `final` (files or folders) whose process is gone; returns them."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for p in final.parent.iterdir():
            owner = temp_owner(p)
            if owner is None or owner[0] != final.name or owner[1] == os.getpid() or pid_alive(owner[1]):
                continue
            remove_path(p)
            removed.append(p)
    return removed


def remove_path(p: Path) -> None:
    """Remove a file, link or folder tree; nothing if it is gone."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def remove_contents(folder: Path, created: bool) -> None:
    """Take back what a command wrote into `folder`, which was empty before it: the folder itself if the command
    `created` it, else everything in it."""
    for p in [folder] if created else list(folder.iterdir()) if folder.is_dir() else []:
        remove_path(p)


def fsync_dir(directory: Path) -> None:
    """Make the renames inside `directory` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write `final` under; when the block ends, the file is flushed to disk and
    renamed to `final` in one step, so a reader (or a kill) never sees half a file, nor a full disk's stub. On any
    failure the temporary is removed and `final` is as it was."""
    final = Path(final)
    tmp = _temp_path(final)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh, empty temporary folder to fill; when the block ends, it replaces `final` in one rename, its
    files flushed to disk first. An old `final` is moved aside to `.NAME.old` and removed last, so a kill at any
    moment leaves one complete folder (`restore_dir` settles a kill between the two renames). On any failure the
    temporary is removed and `final` is as it was. What earlier kills left beside `final` is settled first."""
    final = Path(final)
    restore_dir(final)
    remove_stale_temps(final)
    tmp = _temp_path(final)
    remove_path(tmp)  # a leftover of an earlier process that had our PID
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _replace_dir(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise


def _replace_dir(tmp: Path, final: Path) -> None:
    for f in tmp.iterdir():
        if f.is_file():
            _fsync_file(f)
    fsync_dir(tmp)
    old = final.with_name(f".{final.name}.old")
    if final.exists() or final.is_symlink():
        remove_path(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    remove_path(old)


def restore_dir(final: Path) -> None:
    """Undo a kill inside `atomic_dir`'s renames: put back a `final` left moved aside, or remove the old copy left
    behind once the new `final` is in place (only complete folders are ever renamed to `final`)."""
    old = final.with_name(f".{final.name}.old")
    if not (old.exists() or old.is_symlink()):
        return
    if final.exists() or final.is_symlink():
        remove_path(old)
    else:
        os.replace(old, final)


@contextlib.contextmanager
def staged_output(out: str | Path, command: str, force: bool) -> Iterator[Path]:
    """The whole recipe for an output folder that `axiom COMMAND` replaces as a whole: yield a fresh temporary
    folder; on success it is marked as written by `axiom COMMAND` and replaces `out` in one rename (`atomic_dir`).
    `out` is checked (`check_replaceable`) and locked meanwhile; a full or read-only target is one AxiomError; on
    any failure `out` is left as it was."""
    out = check_replaceable(out, command, force)
    with write_errors(out, "nothing was replaced; fix that and run the command again"), output_lock(out, command):
        restore_dir(out)  # a replacement a kill interrupted: the folder that is back must pass the check too
        check_replaceable(out, command, force)  # again: another command may have written it meanwhile
        with atomic_dir(out) as tmp:
            yield tmp
            write_marker(tmp, command)


def file_mode() -> int:
    """The mode `open()` gives a new file here (0o666 less the process umask), for files that a library writes
    with another (safetensors: 0o600). Read from /proc where it can be: setting the umask to learn it races with
    other threads' file creation."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return 0o666 & ~int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


# ---- names read from files


def member(folder: Path, name: object, where: str) -> Path:
    """`folder / name` for a file name read from a manifest or index (`where` names the field for the message):
    a relative path that stays inside `folder`; absolute paths, `..` and non-strings are refused."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise AxiomError(f"{where}: {name!r} is not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise AxiomError(f"{where}: {name!r} points outside {folder}; only files inside the folder are read")
    return folder / pure
