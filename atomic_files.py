"""Files that are whole or absent: every file Quickstep writes for later (saved and cached schedules, cache
calibrations, the batch runner's manifest and images) goes through `write_atomically`. A process killed mid-write
leaves the previous file as it was, never a torn one.

Plain Python on purpose: the nodes import it inside ComfyUI (`from ..atomic_files import ...`) and the batch runner,
which runs outside ComfyUI, imports it from the pack's directory (`from atomic_files import ...`).

The temporary file sits in the target's folder (os.replace is atomic only within one file system) under a name that
no reader takes for a result: it starts with a dot and ends in `.tmp`, and it carries the writer's process id, so
that the next write of the same file removes what a killed writer left behind.
"""
import json
import os
import tempfile
import time

TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".tmp"
ORPHAN_AGE_S = 24 * 3600   # a temporary file this old is an orphan even where the writer's pid cannot be checked


def write_atomically(path, data):
    """Write `data` (bytes) to `path`: a temporary file in the same folder, fsync, os.replace, fsync the folder."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    remove_orphaned_temp_files(folder, name)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=f".{name}{TEMP_SUFFIX}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def write_json_atomically(path, payload):
    write_atomically(path, json.dumps(payload, indent=1).encode())


def is_temp_file(file_name):
    return file_name.startswith(TEMP_PREFIX) and file_name.endswith(TEMP_SUFFIX)


def remove_orphaned_temp_files(folder, name):
    """Remove the temporary files of `folder/name` whose writer is gone (killed mid-write); those of a live writer
    stay."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        if not (is_temp_file(entry.name) and entry.name.endswith(f".{name}{TEMP_SUFFIX}")):
            continue
        pid = entry.name[len(TEMP_PREFIX):].split("-", 1)[0]
        try:
            orphaned = (pid.isdigit() and not _process_alive(int(pid))) or \
                time.time() - entry.stat().st_mtime > ORPHAN_AGE_S
            if orphaned:
                os.unlink(entry.path)
        except FileNotFoundError:
            pass   # its writer finished or another cleaner got there first


def _process_alive(pid):
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True   # os.kill(pid, 0) would terminate the process on Windows: rely on ORPHAN_AGE_S there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # another user's live process
    return True


def _fsync_folder(folder):
    """Make the rename itself durable (POSIX; Windows cannot open a folder for fsync)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
