"""Checked loading for `from_pretrained`: transformers does the work, this turns its silent or vague
outcomes into errors that name the file and the problem.

- weights are loaded from safetensors, or from a legacy `pytorch_model.bin` only with torch's
  `weights_only` unpickler: a pickle that would run code is refused, never executed;
- a corrupt or truncated file, a missing or unexpected trunk key, and a shape mismatch are errors
  (pass `strict=False` to get transformers' warnings instead; `ignore_mismatched_sizes=True` for a new head);
- `output_loading_info=True` asks for a report: missing and unexpected keys are reported in it, as transformers
  does, instead of raised.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

# Parameters a checkpoint of another DiNAT head type legitimately lacks or carries extra:
# the classifier, the final norm (absent from backbones) and the backbone's per-stage norms.
HEAD_PREFIXES = ("classifier.", "dinat.layernorm.", "layernorm.", "hidden_states_norms.")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


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
            if os.path.isfile(candidate):
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
    try:
        # load with mismatches allowed, so that we can name the key and both shapes ourselves
        model, info = load(name_or_path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{weights_file_hint(name_or_path, kwargs)}: refused to load: the pickle holds more than "
                         f"tensors and would run code or build arbitrary objects ({_first_line(err)}); "
                         "convert trusted checkpoints to safetensors") from None
    except Exception as err:
        if _raised_while_reading_weights(err):
            raise ValueError(f"{weights_file_hint(name_or_path, kwargs)}: corrupt or truncated weights file "
                             f"({_first_line(err)})") from None
        raise

    mismatched = sorted(info.get("mismatched_keys", ()))
    if mismatched and not ignore_mismatched:
        details = "; ".join(f"{key}: checkpoint {tuple(ckpt)} vs model {tuple(model_shape)}"
                            for key, ckpt, model_shape in mismatched)
        raise CheckpointMismatchError(f"{weights_file_hint(name_or_path, kwargs)}: shape mismatch: {details}. For a "
                                      "new classification head pass ignore_mismatched_sizes=True (with num_labels=...)")
    if strict and not want_info:
        missing = sorted(k for k in info.get("missing_keys", ()) if not _is_head_key(k))
        unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not _is_head_key(k))
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if problems:
            raise CheckpointMismatchError(f"{weights_file_hint(name_or_path, kwargs)}: checkpoint does not match "
                                          f"the {type(model).__name__} architecture in its config: "
                                          + "; ".join(problems) + " (pass strict=False to load anyway)")
    return (model, info) if want_info else model


def _raised_while_reading_weights(err: BaseException) -> bool:
    """Whether the error came out of torch's or safetensors' file readers (a bad file, not a bad call)."""
    if type(err).__name__ == "SafetensorError":
        return True
    tb = err.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if filename.endswith("torch/serialization.py") or "/safetensors/" in filename:
            return True
        tb = tb.tb_next
    return False


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # torch's weights-only message puts the useful part last ("Trying to load unsupported GLOBAL ...")
    useful = [line for line in lines if "GLOBAL" in line or "unsupported" in line.lower()]
    return (useful or lines or [type(err).__name__])[0]
