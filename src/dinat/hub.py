"""Clear errors for checkpoints that cannot be found: a mistyped id or folder, or offline with nothing cached.

transformers and huggingface_hub resolve hub ids through the local cache (`HF_HUB_CACHE`, by default
~/.cache/huggingface/hub) and, offline (`HF_HUB_OFFLINE=1`), through it alone. Their own errors for a
missing checkpoint are long and mention the network; `clear_loading_errors` replaces them with one sentence
that says what was looked for, where, and how to fix it. Errors about a checkpoint that *was* found (a
corrupt file, a shape mismatch) pass through unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .registry import VARIANTS


class CheckpointNotFoundError(OSError):
    """A model or processor could not be found locally, in the cache, or (when online) on the hub."""


def is_offline() -> bool:
    """True when huggingface_hub will not use the network (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return True
    return os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def is_cached(repo_id: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the hub cache holds any snapshot of `repo_id` (a model repository)."""
    folder = Path(cache_dir or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    snapshots = folder / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def describe_missing(name: str, what: str = "model", cache_dir: str | os.PathLike | None = None) -> str:
    """One sentence: what was looked for, where, and how to fix it."""
    cache = str(cache_dir or hub_cache_dir())
    if name in VARIANTS and VARIANTS[name].pretrained.hub_id:
        return (f"cannot load {what} {name!r}: it is a preset name, not a checkpoint; its pretrained checkpoint is "
                f"{VARIANTS[name].pretrained.hub_id!r} (DinatConfig.from_preset({name!r}) builds the untrained model)")
    looks_like_path = (os.sep in name and not _looks_like_repo_id(name)) or name.startswith((".", "~"))
    if looks_like_path or Path(name).suffix in {".json", ".bin", ".safetensors"}:
        return (f"cannot load {what} {name!r}: there is no such folder or file; check the path "
                "(a local checkpoint is a folder holding config.json and the weights)")
    if is_offline():
        return (f"cannot load {what} {name!r}: it is not a local folder and there is no copy of hub repository "
                f"{name!r} in the Hugging Face cache ({cache}) while offline (HF_HUB_OFFLINE=1); check the id's "
                "spelling (e.g. 'shi-labs/dinat-mini-in1k-224'), download it once with network access "
                f"(`hf download {name}`), or set HF_HUB_CACHE to a cache that holds it")
    return (f"cannot load {what} {name!r}: it is not a local folder, not in the Hugging Face cache ({cache}), "
            "and the hub did not provide it (mistyped id, private repository, or no network?); check the id's "
            "spelling (e.g. 'shi-labs/dinat-mini-in1k-224') or pass a local folder")


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith(("/", "."))


@contextlib.contextmanager
def clear_loading_errors(name: str | os.PathLike, what: str = "model",
                         cache_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Re-raise "not found" failures while loading `name` as a CheckpointNotFoundError with a clear message."""
    try:
        yield
    except CheckpointNotFoundError:
        raise
    except (OSError, ValueError) as err:
        denied = _permission_denied(name)
        if denied:
            raise PermissionError(denied) from err
        if not _is_not_found(name, err, cache_dir):
            raise
        raise CheckpointNotFoundError(describe_missing(str(name), what, cache_dir)) from err


def _permission_denied(name) -> str | None:
    """A message when `name` is a local path that exists but cannot be reached or read by this user (os.path.exists
    says False for those, which would read as "no such folder")."""
    if not isinstance(name, (str, os.PathLike)):
        return None
    try:
        os.stat(name)
        if os.path.isdir(name):
            os.listdir(name)
    except PermissionError as err:
        return (f"cannot load {os.fspath(name)!r}: permission denied for {err.filename or os.fspath(name)!r}: it "
                "exists but this user cannot read it")
    except OSError:
        return None
    return None


def _is_not_found(name, err: Exception, cache_dir) -> bool:
    """True when `name` is neither an existing path nor a cached hub repository: nothing was found to load, so
    whatever failed (a hub lookup, id validation, a wrapped ValueError) failed for that reason."""
    if not isinstance(name, (str, os.PathLike)):
        return False
    text = str(name)
    if os.path.exists(text):
        return False  # found locally: the error is about its contents, keep it
    return not (_looks_like_repo_id(text) and is_cached(text, cache_dir))


__all__ = ["CheckpointNotFoundError", "clear_loading_errors", "describe_missing", "is_cached", "is_offline"]
