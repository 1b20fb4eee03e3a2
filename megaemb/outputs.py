"""How megaemb writes what a user asked for: one job per output, only its own files replaced,
whole files or none, and a full disk as one line.

* **Lock.** A job owns its output (``sft --save``, ``export --output_dir``, ``embed`` / ``eval``
  / ``mine --output``) for its whole run through a lock file: ``megaemb.lock`` inside
  ``--save``, ``<path>.lock`` beside the others (an export replaces its whole directory). The
  lock is created with ``O_EXCL`` and names its holder: host, pid, the process's start time
  and the command. A second job stops with one line naming the holder. A lock whose holder is
  gone (same host, and no process with that pid and start time: killed, crashed, rebooted) is
  taken over with a note; a lock held on another host is never broken (its liveness cannot be
  checked from here): the message says to delete it if that job is dead. Same-host take-overs
  are serialised by ``flock`` on the directory. A ``--save`` the job created and left empty
  (it failed before writing anything) is removed with the lock.
* **Manifest.** ``export`` lists the entries it wrote in ``megaemb-export.json``;
  ``--overwrite true`` replaces a directory only when every entry in it is listed there.
* **Atomic files.** ``atomic_file`` writes ``<path>.tmp<pid>`` and renames it over ``path``;
  on any failure the temp file is removed.
* **Full disk.** ``disk_full`` finds ``ENOSPC`` / ``EDQUOT`` in an error's chain;
  ``cli.main`` reports it in one line.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import socket
import sys

LOCK_NAME = "megaemb.lock"  # inside --save
MANIFEST = "megaemb-export.json"  # inside an export's --output_dir
FULL = (errno.ENOSPC, errno.EDQUOT)
RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error prints its errno


# ------------------------------------------------------------------------------------ lock
def lock_path(path: str, inside: bool) -> str:
    """The lock of output ``path``: inside it (a directory megaemb adds to) or beside it."""
    path = os.path.abspath(path)
    return os.path.join(path, LOCK_NAME) if inside else path.rstrip(os.sep) + ".lock"


def this_process(command: str) -> dict:
    """The lock record of this process."""
    import psutil

    now = datetime.datetime.now(datetime.timezone.utc)
    return {"command": command, "host": socket.gethostname(), "pid": os.getpid(),
            "created": psutil.Process().create_time(), "started": now.strftime("%Y-%m-%d %H:%M:%S UTC")}


def holder_is_gone(holder: dict) -> bool:
    """Whether the lock's holder surely no longer runs: it ran on this host and no process has
    its pid with its start time. False when unknown (another host, an unreadable record)."""
    import psutil

    if holder.get("host") != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(int(holder["pid"])).create_time() - float(holder["created"])) > 1.0
    except psutil.NoSuchProcess:  # zombies too
        return True
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def describe(holder: dict) -> str:
    """``megaemb sft (host h, pid 12, started ...)``, or what is known of an unreadable lock."""
    if not holder:
        return "an unknown job (the lock file is unreadable)"
    return (f"{holder.get('command', 'megaemb')} (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"started {holder.get('started')})")


def _read(lock: str) -> dict | None:
    """The record of ``lock``; None when there is no lock, {} when it cannot be read."""
    try:
        with open(lock) as f:
            record = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _create(lock: str, record: dict) -> None:
    """Create ``lock`` holding ``record``; ``FileExistsError`` if it exists."""
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(lock)
        raise


@contextlib.contextmanager
def _serialised(directory: str):
    """Hold ``flock`` on ``directory``: lock files of this host are read, broken and created
    one process at a time (a file system without flock: unguarded, a microsecond window)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def acquire(lock: str, record: dict, what: str, note=None) -> None:
    """Create ``lock`` for ``record``, taking over a dead holder's (``note`` says so); raises
    ``FileExistsError`` naming a live or unknown holder. ``what`` starts messages (``--save out``)."""
    note = note or (lambda line: print(line, file=sys.stderr, flush=True))
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with _serialised(os.path.dirname(lock)):
        for _ in range(3):
            try:
                _create(lock, record)
                return
            except FileExistsError:
                holder = _read(lock)
            if holder is None:  # released meanwhile
                continue
            if not holder_is_gone(holder):
                raise FileExistsError(_busy(what, lock, holder))
            os.remove(lock)
            note(f"{record['command']}: note: {what}: taking over the lock of {describe(holder)}, "
                 "which is no longer running")
    raise FileExistsError(_busy(what, lock, _read(lock) or {}))


def check_free(path: str, inside: bool, what: str) -> None:
    """Raise ``FileExistsError`` naming the holder if a live (or unknown) job holds ``path``'s
    lock; reads only (``acquire`` takes it)."""
    lock = lock_path(path, inside)
    holder = _read(lock)
    if holder is not None and not holder_is_gone(holder):
        raise FileExistsError(_busy(what, lock, holder))


def _busy(what: str, lock: str, holder: dict) -> str:
    text = f"{what}: in use by {describe(holder)}; wait for it to end or write elsewhere"
    if not holder or holder.get("host") != socket.gethostname():
        text += f" (if that job is dead, delete {lock})"
    return text


def release(lock: str, record: dict) -> None:
    """Remove ``lock`` if ``record`` still holds it."""
    with contextlib.suppress(OSError), _serialised(os.path.dirname(lock)):
        if _read(lock) == record:
            os.remove(lock)


@contextlib.contextmanager
def owned(path: str, inside: bool, what: str, command: str):
    """Hold the lock of output ``path`` for the ``with`` block (see the module docstring)."""
    lock, record = lock_path(path, inside), this_process(command)
    created = _missing_folders(os.path.dirname(lock)) if inside else []
    acquire(lock, record, what)
    try:
        yield lock
    finally:
        release(lock, record)
        with contextlib.suppress(OSError):  # a job that wrote nothing leaves no empty --save
            for folder in created:
                os.rmdir(folder)


def _missing_folders(directory: str) -> list[str]:
    """``directory`` and those of its parents that do not exist, deepest first."""
    missing = []
    while directory and not os.path.exists(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    return missing


# -------------------------------------------------------------------------------- manifest
def _tree_files(directory: str) -> list[str]:
    """Every file (and link) under ``directory`` as a relative '/'-separated path, sorted;
    the manifest itself left out."""
    found = []
    for root, dirs, files in os.walk(directory):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]  # not followed by walk
        for name in files + links:
            rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def write_manifest(directory: str) -> None:
    """Record every file of a finished export ``directory`` (relative paths) as megaemb's."""
    files = _tree_files(directory)  # before atomic_file makes its temp file there
    with atomic_file(os.path.join(directory, MANIFEST)) as f:
        json.dump({"written_by": "megaemb export", "files": files}, f, indent=2)


def foreign_entries(directory: str) -> list[str]:
    """Files anywhere under ``directory`` that no megaemb export wrote (not in its manifest;
    a manifest of an older megaemb, top-level names only, vouches for no nested file)."""
    ours: set = set()
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        with open(os.path.join(directory, MANIFEST)) as f:
            ours.update(json.load(f).get("files", []))
    return [name for name in _tree_files(directory) if name not in ours]


def check_replaceable(directory: str, flag: str) -> None:
    """``directory`` (if any) holds only what a megaemb export wrote; else ``FileExistsError``
    naming the others."""
    if not os.path.isdir(directory):
        return
    foreign = foreign_entries(directory)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{flag} {directory}: holds {shown}, not written by megaemb export; "
                              "--overwrite true replaces only a megaemb export: move them or pick "
                              "another directory")


# ---------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
    """Yield a file open at ``<path>.tmp<pid>``; on success flush it to disk and rename it to
    ``path``, on any failure remove it (a full disk leaves nothing behind)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in FULL and not e.filename:
            e.filename = path
        raise


# ------------------------------------------------------------------------------- full disk
def disk_full(error: BaseException | None) -> OSError | None:
    """The ``ENOSPC`` / ``EDQUOT`` error in ``error``'s chain (cause / context), if any; also
    one that a Rust library (safetensors) reports as text, ``... (os error 28)``."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in FULL:
            return error
        code = RUST_IO_ERROR.search(str(error))
        if code and int(code.group(1)) in FULL:
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def full_message(error: OSError) -> str:
    """One line for a full disk or quota: where, and what to do."""
    where = f"writing {error.filename}: " if error.filename else ""
    return f"{where}{os.strerror(error.errno)} (free space, or write elsewhere)"
