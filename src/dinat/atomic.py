"""Checkpoint folders written so that nothing is lost: the one way this library writes a checkpoint.

`replace_checkpoint(target)` yields an empty staging folder; whatever is written into it becomes the new
`target` in one step when the block ends. The protocol (docs/reliability.md, "Files"):

1. Checks first, nothing touched yet: `target` must not be a file, nor the current working directory or a
   folder containing it, nor contain any path in `protect` (e.g. the checkpoint being converted).
2. Staging: `.<name>.dinat-staging-<pid>-<random>` in target's parent folder (never inside target, never above
   it), created with the process's umask like any folder. The caller writes into it; every file is fsynced.
3. Swap, holding an exclusive `fcntl` lock on `.<name>.dinat-lock` in the parent folder:
   - files of the existing target that the new checkpoint does not own (e.g. `preprocessor_config.json` when
     the model is saved, or a README) are hard-linked (copied where links fail) into the staging folder; the
     owned ones (config.json and every weights file, sharded or not) are not, so no stale weights survive;
   - no target yet: `rename(staging, target)`;
   - target exists: Linux `renameat2(RENAME_EXCHANGE)` swaps the two folders in one atomic step. Where that
     is unavailable, `rename(target, .<name>.dinat-old-<pid>-<random>)` then `rename(staging, target)`;
   - the parent folder is fsynced, the lock released, and the old content (now under the staging or old
     name) is deleted.
   A kill at any instant leaves `target` complete (old or new); only in the two-rename fallback, between its
   two renames, is the old checkpoint complete under its `.dinat-old-` name, and the next write (or load
   through this library) renames it back.
4. The next write to the same target removes staging and old folders whose process is gone.

Readers: `DinatPreTrainedModel.from_pretrained` holds a shared lock on the same lock file while it reads a
local folder, so a load never mixes two saves (config.json of one, weights of another). Two writers
serialize on the swap; the last one wins and the folder is always one complete checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

try:  # POSIX; on other systems writes are still staged and renamed, without the cross-process lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_STAGING = ".dinat-staging-"
_OLD = ".dinat-old-"
_LOCK = ".dinat-lock"
_RENAME_EXCHANGE = 2

# the files a model checkpoint owns: a save replaces all of them (and removes those it does not write)
MODEL_FILE_PREFIXES = ("model.safetensors", "model-", "pytorch_model", "tf_model", "flax_model")
MODEL_FILES = ("config.json", "generation_config.json")
PROCESSOR_FILES = ("preprocessor_config.json",)

_active_staging: set[str] = set()  # staging folders of this process, written into directly


class UnsafeTargetError(ValueError):
    """The folder to write cannot be written safely (it is a file, holds the working directory or the source)."""


def model_owns(name: str) -> bool:
    return name in MODEL_FILES or name.startswith(MODEL_FILE_PREFIXES)


def processor_owns(name: str) -> bool:
    return name in PROCESSOR_FILES


def owns_everything(name: str) -> bool:
    return True


def is_staging(path: str | os.PathLike) -> bool:
    """Whether `path` is a staging folder this process is writing (write into it directly, no second swap)."""
    return os.path.realpath(path) in _active_staging


def check_target(target: str | os.PathLike, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """The absolute, resolved target folder, or UnsafeTargetError saying why it cannot be written."""
    given = str(target)
    path = Path(os.path.realpath(target))
    if path.exists() and not path.is_dir():
        raise UnsafeTargetError(f"{given} is a file, not a folder; a checkpoint is saved as a folder "
                                "(config.json, weights, ...); give a folder path")
    if path.parent == path:
        raise UnsafeTargetError(f"refusing to write a checkpoint over the filesystem root {given!r}")
    cwd = Path(os.path.realpath(os.getcwd()))
    if cwd == path or path in cwd.parents:
        raise UnsafeTargetError(f"refusing to write a checkpoint to {given!r}: it is the current working directory "
                                "or contains it, and the folder is replaced as a whole; give a new sub-folder")
    for source in protect:
        source_path = Path(os.path.realpath(source))
        if source_path == path or path in source_path.parents:
            raise UnsafeTargetError(f"refusing to write a checkpoint to {given!r}: it contains {str(source)!r}, "
                                    "which is being read; give another folder")
    return path


@contextlib.contextmanager
def replace_checkpoint(target: str | os.PathLike, owns: Callable[[str], bool] = owns_everything,
                       protect: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a staging folder; when the block ends without error, it becomes `target` (see the module doc).

    `owns(name)` says which top-level entries of an existing target the new content replaces; the others are
    kept. With the default, the new folder replaces the old one entirely.
    """
    path = check_target(target, protect)
    if is_staging(path):  # already inside a replace_checkpoint of this process: write directly
        path.mkdir(exist_ok=True)
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        _clean_stale(path)
    staging = path.parent / f".{path.name}{_STAGING}{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(staging)  # mode 0o777 minus the umask, as any folder the user creates
    _active_staging.add(str(staging))
    try:
        yield staging
        _fsync_tree(staging)
        with _locked(path):
            if path.is_dir():
                for entry in os.listdir(path):
                    if not owns(entry) and not os.path.lexists(staging / entry):
                        _link_tree(path / entry, staging / entry)
                _fsync_tree(staging)
            _swap(staging, path)
            _fsync_dir(path.parent)
    finally:
        _active_staging.discard(str(staging))
        shutil.rmtree(staging, ignore_errors=True)  # the new content on failure, the old one after an exchange


def save_together(target: str | os.PathLike, *savables, protect: Iterable[str | os.PathLike] = ()) -> None:
    """`save_pretrained` of each object (a model and its processor, say) into one staging folder, swapped in
    as `target` at once: a reader sees all of the old checkpoint or all of the new one."""
    with replace_checkpoint(target, protect=protect) as staging:
        for savable in savables:
            savable.save_pretrained(staging)


@contextlib.contextmanager
def reading(folder, subfolder: str | None = None) -> Iterator[None]:
    """Hold a shared lock while reading a local checkpoint folder, so that no save swaps it meanwhile.

    Only where a writer of this library created the lock file; read-only locations are read unlocked.
    """
    if not isinstance(folder, (str, os.PathLike)):
        yield
        return
    path = Path(os.path.realpath(os.path.join(folder, subfolder or "")))
    restore_interrupted(path)
    if fcntl is None or not path.is_dir():
        yield
        return
    try:
        fd = os.open(_lock_path(path), os.O_RDONLY)
    except OSError:  # never written by this library (or not readable): nothing to wait for
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def restore_interrupted(folder: str | os.PathLike) -> None:
    """Put back a checkpoint that an interrupted fallback swap left under its `.dinat-old-` name (if any)."""
    path = Path(os.path.realpath(folder))
    if path.exists() or not path.parent.is_dir():
        return
    if any(p.name.startswith(f".{path.name}{_OLD}") for p in _siblings(path)):
        try:
            with _locked(path):
                _clean_stale(path)
        except OSError:  # a read-only location: the load then reports the folder as missing
            pass


# -------------------------------------------------------------------------------------------------
# internals
# -------------------------------------------------------------------------------------------------
def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}{_LOCK}"


def _siblings(path: Path) -> list[Path]:
    try:
        return list(path.parent.iterdir())
    except OSError:
        return []


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the exclusive (writer's) lock of `path`, creating its lock file if needed."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _clean_stale(path: Path) -> None:
    """Under the exclusive lock: restore an old checkpoint set aside by an interrupted fallback swap, and delete
    staging/old folders of processes that no longer run."""
    for sibling in _siblings(path):
        name = sibling.name
        for marker in (_STAGING, _OLD):
            prefix = f".{path.name}{marker}"
            if not name.startswith(prefix):
                continue
            pid_text = name[len(prefix):].split("-")[0]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            if marker == _OLD and not path.exists():
                os.rename(sibling, path)
            else:
                shutil.rmtree(sibling, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap(staging: Path, path: Path) -> None:
    """Make `staging` the content of `path`; afterwards `staging` holds the old content (or nothing)."""
    if not os.path.lexists(path):
        os.rename(staging, path)
        return
    if not path.is_dir():
        raise UnsafeTargetError(f"{path} became a file while the checkpoint was written; nothing replaced")
    if _exchange(staging, path):
        return
    old = path.parent / f".{path.name}{_OLD}{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(path, old)
    os.rename(staging, path)
    os.rename(old, staging)  # deleted by the caller


def _link_tree(source: Path, destination: Path) -> None:
    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
    elif source.is_dir():
        os.mkdir(destination)
        for entry in os.listdir(source):
            _link_tree(source / entry, destination / entry)
    else:
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync folders
        pass
    finally:
        os.close(fd)


__all__ = ["UnsafeTargetError", "check_target", "is_staging", "model_owns", "processor_owns", "reading",
           "replace_checkpoint", "restore_interrupted", "save_together"]
