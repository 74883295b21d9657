"""Checked loading for `from_pretrained`: transformers does the work, this turns its silent or vague
outcomes into errors that name the file and the problem.

- weights are loaded from safetensors, or from a legacy `pytorch_model.bin` only with torch's
  `weights_only` unpickler: a pickle that would run code is refused, never executed;
- a corrupt or truncated file, a missing or unexpected trunk key, and a shape mismatch are errors
  (pass `strict=False` to get transformers' warnings instead; `ignore_mismatched_sizes=True` for a new head);
- `output_loading_info=True` asks for a report: missing and unexpected keys are reported in it, as transformers
  does, instead of raised.
- a classification model whose head (`classifier.*`) or final norm (`layernorm.*`) is not in the checkpoint is an
  error (MissingHeadError) unless a new head was asked for (`num_labels=`, `ignore_mismatched_sizes=True` or
  `strict=False`): then a NewHeadWarning lists what was newly initialized;
- integer or bool tensors for float weights are an error (a warning with `strict=False`);
- before transformers reads anything, the files are checked so that each message names the real cause: a file
  given instead of the folder, weights without config.json, a weights path that is a folder, a file that cannot
  be read (permission), a corrupt file (safetensors' SafetensorError, a broken zip, bytes that are no pickle), and
  a pickle that would run code (torch's weights_only unpickler refusing a global).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from typing import Any

from safetensors import SafetensorError, safe_open

# Parameters a checkpoint of another DiNAT head type legitimately lacks or carries extra:
# the classifier, the final norm (absent from backbones) and the backbone's per-stage norms.
HEAD_PREFIXES = ("classifier.", "dinat.layernorm.", "layernorm.", "hidden_states_norms.")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# what a classification model needs from its checkpoint (a backbone checkpoint has neither)
REQUIRED_HEAD_PREFIXES = {"DinatForImageClassification": ("classifier.", "dinat.layernorm."),
                          "DinatModel": ("layernorm.",)}


class CheckpointFileError(ValueError):
    """A weights file is corrupt, truncated, not a checkpoint, or would run code; the message says which."""


class MissingHeadError(ValueError):
    """The checkpoint lacks the classification head or final norm of the model asked for."""


class WeightDtypeError(ValueError):
    """The checkpoint holds integer or bool tensors where the model has floating-point weights."""


class LoadWarning(UserWarning):
    """Something about a loaded checkpoint the user must know (`dinat predict` prints these on stderr)."""


class NewHeadWarning(LoadWarning):
    """Parameters of the head / final norm were newly initialized (not in the checkpoint): train before use."""


class CheckpointMismatchError(ValueError, RuntimeError):
    """A checkpoint that does not fit the model. A ValueError like this package's other bad-input errors, and a
    RuntimeError like transformers' own size-mismatch error, so callers written for either catch it."""


def weights_file_hint(name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> str:
    """The weights file that from_pretrained reads, for error messages (best effort)."""
    path = str(name_or_path)
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            candidate = os.path.join(path, subfolder, name)
            if os.path.lexists(candidate):
                return candidate
        return os.path.join(path, subfolder)
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in WEIGHT_FILES:
            found = try_to_load_from_cache(path, os.path.join(subfolder, name) if subfolder else name,
                                           cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"))
            if isinstance(found, str):
                return found
    except Exception:  # the hint must never hide the real error
        pass
    return path


def _is_head_key(key: str) -> bool:
    return key.startswith(HEAD_PREFIXES)


def checked_from_pretrained(load, name_or_path, args, kwargs: dict[str, Any]):
    """Run transformers' from_pretrained (`load`) and raise clear errors for bad checkpoints."""
    strict = kwargs.pop("strict", True)
    if kwargs.get("weights_only") is False:
        raise ValueError("dinat loads pytorch_model.bin files only with torch's weights_only unpickler; "
                         "weights_only=False (full unpickling, which can run code) is not supported")
    want_info = kwargs.pop("output_loading_info", False)
    ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
    new_head_asked = "num_labels" in kwargs or ignore_mismatched or not strict
    check_local_checkpoint(name_or_path, kwargs)
    weights = weights_file_hint(name_or_path, kwargs)
    if os.path.isfile(weights):
        for path in weight_files(weights):
            check_weights_file(path)
    try:
        # load with mismatches allowed, so that we can name the key and both shapes ourselves
        model, info = load(name_or_path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise _pickle_error(weights, err) from None
    except SafetensorError as err:
        raise CheckpointFileError(f"{weights}: corrupt or truncated safetensors file ({_first_line(err)})") from None
    except PermissionError as err:
        raise PermissionError(f"{err.filename or weights}: permission denied: the file exists but this user cannot "
                              "read it") from None
    except zipfile.BadZipFile as err:
        raise CheckpointFileError(f"{weights}: corrupt or truncated weights file ({_first_line(err)})") from None

    mismatched = sorted(info.get("mismatched_keys", ()))
    if mismatched and not ignore_mismatched:
        details = "; ".join(f"{key}: checkpoint {tuple(ckpt)} vs model {tuple(model_shape)}"
                            for key, ckpt, model_shape in mismatched)
        raise CheckpointMismatchError(f"{weights}: shape mismatch: {details}. For a new "
                                      "classification head pass ignore_mismatched_sizes=True (with num_labels=...)")
    missing_head = sorted(k for k in info.get("missing_keys", ())
                          if k.startswith(REQUIRED_HEAD_PREFIXES.get(type(model).__name__, ())))
    if missing_head and not new_head_asked and not want_info:
        backbone = any(k.startswith("hidden_states_norms.") for k in info.get("unexpected_keys", ()))
        raise MissingHeadError(
            f"{weights}: the checkpoint has no {_head_description(missing_head)} for {type(model).__name__} "
            f"(missing {', '.join(missing_head)})" + ("; it is a DinatBackbone checkpoint" if backbone else "")
            + ". Its predictions would come from random weights. To train a new head pass num_labels=N "
            "(or ignore_mismatched_sizes=True / strict=False); to use the features, load DinatModel or DinatBackbone")
    if missing_head:
        warnings.warn(f"{weights}: newly initialized, not in the checkpoint: {', '.join(missing_head)}; "
                      f"train {type(model).__name__} before using its predictions", NewHeadWarning, stacklevel=3)
    if strict and not want_info:
        missing = sorted(k for k in info.get("missing_keys", ()) if not _is_head_key(k))
        unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not _is_head_key(k))
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if problems:
            raise CheckpointMismatchError(f"{weights}: checkpoint does not match the "
                                          f"{type(model).__name__} architecture in its config: " + "; ".join(problems)
                                          + " (pass strict=False to load anyway)")
    if os.path.isfile(weights):
        _check_dtypes(model, weights, kwargs.get("key_mapping") or {}, strict)
    return (model, info) if want_info else model


def _head_description(keys: list[str]) -> str:
    head = any(k.startswith("classifier.") for k in keys)
    norm = any("layernorm." in k for k in keys)
    return " and ".join(part for part, present in (("classification head", head), ("final norm", norm)) if present)


# -------------------------------------------------------------------------------------------------
# Checks of the files, before transformers reads them
# -------------------------------------------------------------------------------------------------
def check_local_checkpoint(name_or_path, kwargs: dict[str, Any]) -> None:
    """A local path must be a folder, and a folder with weights must have its config.json."""
    path = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else None
    if path is None or not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is a file; from_pretrained takes the checkpoint folder (here "
                                 f"{os.path.dirname(path) or '.'!r}, holding config.json and the weights) or a hub id")
    folder = os.path.normpath(os.path.join(path, kwargs.get("subfolder") or ""))
    try:
        names = os.listdir(folder)
    except PermissionError:
        raise PermissionError(f"{folder}: permission denied: the folder exists but this user cannot list it") from None
    except FileNotFoundError:
        return  # a missing subfolder: transformers' own message names it
    if kwargs.get("config") is None and "config.json" not in names and any(n in names for n in WEIGHT_FILES):
        raise FileNotFoundError(f"{folder} holds weights but no config.json, which describes the architecture; "
                                "save checkpoints with save_pretrained, or pass config=DinatConfig(...)")
    for name in ("config.json", *WEIGHT_FILES):
        if name in names and os.path.isdir(os.path.join(folder, name)):
            raise IsADirectoryError(f"{os.path.join(folder, name)} is a folder, not a file")


def weight_files(path: str) -> list[str]:
    """The weights files behind `path`: itself, or the shards listed in an index JSON."""
    if not path.endswith(".index.json"):
        return [path]
    check_readable(path)
    try:
        with open(path, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointFileError(f"{path}: corrupt shard index (not JSON with a 'weight_map': {err})") from None
    folder = os.path.dirname(path)
    return [os.path.join(folder, shard) for shard in shards]


def check_readable(path: str) -> None:
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a weights file")
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path}: no such file (listed in the checkpoint's shard index)")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise PermissionError(f"{path}: permission denied: the file exists but this user cannot read it") from None


def check_weights_file(path: str) -> None:
    """Raise a clear error when `path` is not a readable, intact safetensors file or torch checkpoint."""
    check_readable(path)
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as err:
            raise CheckpointFileError(f"{path}: corrupt or truncated safetensors file ({_first_line(err)})") from None
        return
    with open(path, "rb") as handle:
        head = handle.read(2)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise CheckpointFileError(f"{path}: corrupt or truncated weights file ({_first_line(err)})") from None
        if bad is not None:
            raise CheckpointFileError(f"{path}: corrupt or truncated weights file (checksum error in {bad})")
    elif head == b"PK":  # a zip archive's signature without its directory at the end
        raise CheckpointFileError(f"{path}: corrupt or truncated weights file (a zip archive without its "
                                  "central directory)")
    elif not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):  # torch's legacy format: a pickle
        raise CheckpointFileError(f"{path}: not a valid checkpoint: neither a zip archive (torch.save) nor a "
                                  "pickle; corrupt or not a PyTorch weights file")


def _pickle_error(path: str, err: pickle.UnpicklingError) -> CheckpointFileError:
    """torch's weights_only unpickler refused the file: a well-formed pickle it refuses holds more than tensors
    (globals it would import and call); one that does not even parse is corrupt."""
    if _pickle_parses(path):
        return CheckpointFileError(f"{path}: refused to load: the pickle holds more than tensors and would run code "
                                   f"or build arbitrary objects ({_first_line(err)}); convert trusted checkpoints "
                                   "to safetensors")
    return CheckpointFileError(f"{path}: not a valid checkpoint: corrupt pickle data ({_first_line(err)})")


def _pickle_parses(path: str) -> bool:
    """Whether the checkpoint's pickle is well-formed (read with pickletools: nothing is executed)."""
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                data = archive.read(name)
        else:
            with open(path, "rb") as handle:
                data = handle.read()
        for _ in pickletools.genops(data):
            pass
    except Exception:
        return False
    return True


_FLOAT_CODES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def _checkpoint_dtypes(path: str) -> dict[str, str]:
    """key -> dtype name of every tensor in the weights (safetensors headers, or torch's mmap for .bin)."""
    dtypes: dict[str, str] = {}
    for file in weight_files(path):
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    dtypes[key] = handle.get_slice(key).get_dtype()
        elif zipfile.is_zipfile(file):
            import torch

            state = torch.load(file, map_location="meta", weights_only=True)
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    dtypes[key] = "F" if value.is_floating_point() else str(value.dtype).replace("torch.", "")
    return dtypes


def _check_dtypes(model, weights: str, key_mapping: dict[str, str], strict: bool) -> None:
    try:
        dtypes = _checkpoint_dtypes(weights)
    except Exception:  # the load succeeded; the dtype report must not turn that into an unrelated error
        return
    state = model.state_dict()
    wrong = []
    for key, dtype in dtypes.items():
        if dtype in _FLOAT_CODES or dtype == "F":
            continue
        name = key
        for pattern, replacement in key_mapping.items():
            name = re.sub(pattern, replacement, name)
        target = state.get(name, state.get(name.split(".", 1)[-1]))
        if target is not None and target.is_floating_point():
            wrong.append(f"{key} ({dtype})")
    if not wrong:
        return
    message = (f"{weights}: integer or bool tensors for floating-point weights (a corrupt or wrongly exported "
               f"checkpoint; the values were cast): {', '.join(sorted(wrong))}")
    if strict:
        raise WeightDtypeError(message + " (pass strict=False to load anyway)")
    warnings.warn(message, LoadWarning, stacklevel=3)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # torch's weights-only message puts the useful part last ("Trying to load unsupported GLOBAL ...")
    useful = [line for line in lines if "GLOBAL" in line or "unsupported" in line.lower()]
    return (useful or lines or [type(err).__name__])[0]
