"""Build a real huggingface_hub cache on disk (no mocks) holding a small DiNAT checkpoint under a hub id.

The layout is what `hf download` writes: models--{org}--{name}/blobs/<hash> with the file contents,
snapshots/<revision>/<file> symlinks into blobs, and refs/main naming the revision. The checkpoint is a
small DiNAT with a 1000-class head and an ImageNet-like `id2label`, saved as the hub DiNAT checkpoints are:
`config.json`, `pytorch_model.bin` (a pickled state dict) and a legacy `ViTFeatureExtractor`
`preprocessor_config.json`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import FIXTURES  # noqa: F401  (re-exported: the hub tests read fixtures through this module)

REPO_ID = "shi-labs/dinat-mini-in1k-224"
REVISION = "5c2a6b4e0d1f3a9e8b7c6d5e4f3a2b1c0d9e8f7a"  # any 40-hex commit id
LEGACY_PREPROCESSOR = {
    "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 224,
}


def label_names() -> dict[int, str]:
    """1000 distinct labels; a few real ImageNet names so the output reads like the real checkpoint's."""
    names = {i: f"imagenet class {i}" for i in range(1000)}
    names.update({0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 207: "golden retriever",
                  281: "tabby, tabby cat", 999: "toilet tissue, toilet paper, bathroom tissue"})
    return names


def small_dinat_config_dict() -> dict:
    """A DiNAT-mini-shaped config scaled down (embed_dim 16, one layer per stage) with a 1000-class head."""
    id2label = label_names()
    return {
        "architectures": ["DinatForImageClassification"], "model_type": "dinat",
        "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "kernel_size": 7,
        "dilations": [[4], [2], [1], [1]], "mlp_ratio": 2.0, "drop_path_rate": 0.0, "patch_size": 4,
        "num_channels": 3, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
        "id2label": {str(k): v for k, v in id2label.items()}, "label2id": {v: k for k, v in id2label.items()},
    }


def small_dinat_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic weights for `small_dinat_config_dict`, with a spread-out head so the top labels differ."""
    from dinat import DinatConfig, DinatForImageClassification

    torch.manual_seed(seed)
    model = DinatForImageClassification(DinatConfig(**small_dinat_config_dict()))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "classifier" in name or "rpb" in name:
                param.normal_(0.0, 3.0 if "classifier" in name else 0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def write_hub_repo(cache_dir: Path, repo_id: str, files: dict[str, bytes], kind: str = "models") -> Path:
    """Put `files` (name: contents) into a huggingface_hub cache as `hf download` leaves them: blobs named by
    their hash, snapshot links into them, refs/main naming the revision. Returns the snapshot folder."""
    repo_dir = Path(cache_dir) / f"{kind}--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    for filename, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


def build_hub_cache(cache_dir: Path, repo_id: str = REPO_ID, state_dict: dict | None = None) -> Path:
    """Write `repo_id` (the small DiNAT) into a hub cache at `cache_dir`; returns the snapshot folder."""
    state_dict = small_dinat_state_dict() if state_dict is None else state_dict
    weights = io.BytesIO()
    torch.save(state_dict, weights)  # the legacy pickle form of the hub DiNAT checkpoints
    return write_hub_repo(cache_dir, repo_id, {
        "pytorch_model.bin": weights.getvalue(),
        "config.json": json.dumps(small_dinat_config_dict(), indent=2).encode(),
        "preprocessor_config.json": json.dumps(LEGACY_PREPROCESSOR, indent=2).encode(),
    })


def offline_env(cache_dir: Path, home: Path) -> dict[str, str]:
    """Environment for a subprocess that may only use `cache_dir` (huggingface_hub reads these at import)."""
    env = dict(os.environ)
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_HOME", "HF_TOKEN"):
        env.pop(key, None)
    env.update(HF_HOME=str(home), HF_HUB_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    return env


def run_python(code: str, env: dict[str, str], timeout: float = 240) -> dict:
    """Run `code` in a fresh interpreter; it must print one JSON object as its last stdout line."""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
