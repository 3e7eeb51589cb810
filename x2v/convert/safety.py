"""What keeps ``x2v convert`` from losing or mixing files.

* One run per output at a time: an exclusive ``flock`` on a lock file beside each output, held for the whole run;
  the file records the holder's pid and host, so a second run refuses at once and says who holds it.
* Temporary names carry the writer's pid and host (``x2v.formats.writers.temp_path``): a later run removes the
  leftovers of dead runs and never touches those of a live one.
* ``--overwrite`` replaces only the kind of thing x2v writes at a path (a file by a file, a component folder by a
  component folder), never a folder by a file, a file by a folder, or a fifo / socket / device.
* Any OSError while writing becomes one line naming the output file and the cause.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from x2v.convert.options import ConversionError
from x2v.formats.writers import host_name, parse_temp, temp_path

FILE, FOLDER = "file", "folder"
LOCK_SUFFIX = ".x2v-lock"
WRITE_FAILED = "Nothing of this conversion was published; its temporary files were removed."
HINTS = {
    errno.ENOSPC: "free some space on that disk, or write the output elsewhere",
    errno.EDQUOT: "your disk quota is used up; free some space, or write the output elsewhere",
    errno.EACCES: "the folder is not writable for you; write the output elsewhere",
    errno.EPERM: "the folder is not writable for you; write the output elsewhere",
    errno.EROFS: "the file system is read-only; write the output elsewhere",
}


# --- one run per output ---------------------------------------------------------------------------------------

def lock_path(output: Path) -> Path:
    """The lock file of an output: beside it, so it is never mistaken for part of the output folder."""
    output = output.resolve()
    return output.parent / f".{output.name}{LOCK_SUFFIX}"


def same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def lock_holder(fd: int) -> str:
    for _ in range(20):  # a holder that has just taken the lock writes its pid a moment later: wait up to 1 s
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
            return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "pid not recorded"


def record_holder(fd: int) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": host_name(), "started": started}).encode(), 0)


def try_lock(path: Path, output: Path) -> int | None:
    """The locked fd of ``path``; None when the file was removed as it was opened (a holder releasing it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(fd)
        os.close(fd)
        raise ConversionError(f"{output}: another x2v convert is writing it ({holder}; lock file {path}). "
                              "Wait for it to finish or stop it, then run again.") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        return fd  # a file system without locks: convert all the same, as x2v did before it locked
    if same_file(path, fd):
        record_holder(fd)
        return fd
    os.close(fd)
    return None


def take_lock(output: Path) -> int:
    path = lock_path(output)
    make_folder(path.parent)
    try:
        for _ in range(100):
            fd = try_lock(path, output)
            if fd is not None:
                return fd
    except OSError as e:
        raise ConversionError(f"{path}: cannot create the lock file of {output}: {cause(e)}{hint(e)}.") from e
    raise ConversionError(f"{path}: the lock file of {output} keeps disappearing; is something deleting it?")


def release_lock(output: Path, fd: int) -> None:
    """Remove the lock file while still holding it: a run that opened it meanwhile sees it gone and takes a new one."""
    path = lock_path(output)
    try:
        if same_file(path, fd):
            path.unlink()
    except OSError:
        pass  # a lock file left behind is harmless: the next run takes it over
    os.close(fd)


@contextmanager
def output_lock(outputs: list[Path]):
    """Hold the lock of every output (a Wan2.2 folder and each expert's folder) for the duration."""
    held: dict[Path, int] = {}
    try:
        for output in sorted(set(outputs)):
            held[output] = take_lock(output)
        yield
    finally:
        for output, fd in held.items():
            release_lock(output, fd)


# --- leftovers of earlier runs ---------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def is_stale(temp: Path, finals: set[Path]) -> bool:
    """A temporary file whose run is over: its pid is dead on this host; a file of another host or of an older x2v
    is taken as stale only when it is for one of this run's outputs, whose lock this run holds."""
    name = parse_temp(temp)
    if name is None:
        return False
    if name.pid is None or name.host != host_name():
        return temp.parent / name.final in finals
    return name.pid != os.getpid() and not pid_alive(name.pid)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(folders: set[Path], finals: set[Path]) -> None:
    """Temporary files of killed runs in the folders this run writes (best effort: they only take space)."""
    for folder in folders:
        for path in folder.iterdir():
            if is_stale(path, finals):
                try:
                    remove_path(path)
                except OSError:
                    pass


def remove_temps(finals: list[Path]) -> None:
    """This run's temporary files: after an error nothing half-written stays, not even under a temporary name."""
    for final in finals:
        temp = temp_path(final)
        if temp.exists() or temp.is_symlink():
            remove_path(temp)


# --- what may be replaced -------------------------------------------------------------------------------------

def kind_of(path: Path) -> str | None:
    """FILE, FOLDER, "special" or None (nothing, or a dangling link, which replacing loses nothing of)."""
    if not path.exists():
        return None
    if path.is_dir():
        return FOLDER
    return FILE if path.is_file() else "special"


def not_a_folder(folder: Path) -> Path | None:
    """The nearest existing path at or above ``folder`` when it is not a folder (mkdir would fail there)."""
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            return None if path.is_dir() else path
    return None


def blocked_folder(blocking: Path, folder: Path) -> str:
    where = "there" if blocking == folder else f"there for {folder}"
    return (f"{blocking}: is a file, and x2v writes a folder {where}; even --overwrite never replaces a file with a "
            "folder. Move it away, or choose another OUTPUT.")


def kind_problem(path: Path, planned: str) -> str | None:
    existing = kind_of(path)
    if existing in (None, planned):
        return None
    if existing == "special":
        return f"{path}: is not a regular file (a fifo, socket or device); x2v replaces only what it writes."
    return (f"{path}: is a {existing}, and x2v writes a {planned} there; even --overwrite replaces only an output of "
            f"the same kind, never a {existing} with a {planned}. Move it away, or choose another OUTPUT.")


def check_destinations(planned: dict[Path, str], sources: set[Path], overwrite: bool) -> None:
    """Refuse, before anything is written or deleted, outputs that would lose a source or something not x2v's."""
    # A link at an output path (--link-components) is replaced, never written through: only its folder is resolved.
    mine = [p for p in planned if p.parent.resolve() / p.name in sources]
    if mine:
        raise ConversionError(f"{mine[0]}: is a source file of this conversion; write the output somewhere else.")
    for folder in sorted({p.parent for p in planned}):
        blocking = not_a_folder(folder)
        if blocking is not None:
            raise ConversionError(blocked_folder(blocking, folder))
    problems = [problem for path, kind in planned.items() if (problem := kind_problem(path, kind))]
    if problems:
        raise ConversionError(problems[0])
    existing = [p for p in planned if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise ConversionError(f"{existing[0]}: already exists ({len(existing)} of the output paths exist). "
                              "Choose another OUTPUT, or pass --overwrite to replace them.")


def make_room(final: Path) -> None:
    """os.replace swaps a file for a file atomically, but cannot put anything over a folder or a folder over a
    link: such an old output (checked by check_destinations) goes first."""
    temp = temp_path(final)
    folder_involved = (final.is_dir() and not final.is_symlink()) or (temp.is_dir() and not temp.is_symlink())
    if folder_involved and (final.exists() or final.is_symlink()):
        remove_path(final)


def make_folder(folder: Path) -> None:
    blocking = not_a_folder(folder)
    if blocking is not None:
        raise ConversionError(blocked_folder(blocking, folder))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"{folder}: cannot create the folder: {cause(e)}{hint(e)}.") from e


# --- one-line errors ------------------------------------------------------------------------------------------

def cause(error: OSError) -> str:
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        return str(error.args[0][0][-1])  # copytree gathers (source, destination, why) of every failed file
    return error.strerror or str(error)


def hint(error: OSError) -> str:
    return f" ({HINTS[error.errno]})" if error.errno in HINTS else ""


@contextmanager
def reporting(final: Path, doing: str = "written", after: str = WRITE_FAILED):
    """An OSError while producing ``final`` as one line: the output's name (not the temporary one), the cause, and
    what became of the conversion. An error about another file (a source) names that file."""
    try:
        yield
    except OSError as e:
        named = [Path(n) for n in (e.filename, e.filename2) if isinstance(n, (str, os.PathLike))]
        if named and not set(named) & {final, temp_path(final)}:
            message = f"{named[0]}: {cause(e)}{hint(e)} (while {final} was being {doing})"
        else:
            message = f"{final}: could not be {doing}: {cause(e)}{hint(e)}"
        raise ConversionError(f"{message}. {after}") from e
