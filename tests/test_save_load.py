"""save_pretrained / from_pretrained, and clear errors for bad checkpoint files."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CASES
from dinat import DinatBackbone, DinatForImageClassification, DinatModel

TINY = CASES / "tiny_pad" / "model"


def test_legacy_bin_loads_like_safetensors():
    a = DinatForImageClassification.from_pretrained(CASES / "tiny_pad" / "model")
    b = DinatForImageClassification.from_pretrained(CASES / "tiny_pad" / "model_bin")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_new_head_with_ignore_mismatched_sizes():
    model = DinatForImageClassification.from_pretrained(TINY, num_labels=3, ignore_mismatched_sizes=True)
    assert model.classifier.weight.shape == (3, 128)
    reference = load_file(TINY / "model.safetensors")
    key = "dinat.encoder.levels.1.layers.0.attention.self.query.weight"
    assert torch.equal(model.state_dict()[key], reference[key])


def test_shape_mismatch_names_key_and_both_shapes():
    with pytest.raises(ValueError, match=r"classifier.weight: checkpoint \(10, 128\) vs model \(3, 128\)"):
        DinatForImageClassification.from_pretrained(TINY, num_labels=3)


def test_trunk_loads_into_other_heads():
    backbone = DinatBackbone.from_pretrained(TINY)
    model = DinatModel.from_pretrained(TINY)
    reference = load_file(TINY / "model.safetensors")
    key = "encoder.levels.0.layers.0.attention.self.rpb"
    assert torch.equal(backbone.state_dict()[key], reference["dinat." + key])
    assert torch.equal(model.state_dict()[key], reference["dinat." + key])


def _copy_checkpoint(tmp_path, source=TINY):
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    for f in target.iterdir():
        f.chmod(0o644)
    return target


@pytest.mark.parametrize("cut", [0.5, 0.01])
def test_truncated_safetensors_is_named(tmp_path, cut):
    folder = _copy_checkpoint(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match=r"model.safetensors: corrupt or truncated"):
        DinatForImageClassification.from_pretrained(folder)


def test_corrupt_bin_is_named(tmp_path):
    folder = _copy_checkpoint(tmp_path, CASES / "tiny_pad" / "model_bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[:5000])
    with pytest.raises(ValueError, match=r"pytorch_model.bin: corrupt or truncated"):
        DinatForImageClassification.from_pretrained(folder)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    folder = _copy_checkpoint(tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["dinat.encoder.levels.0.layers.0.attention.self.rpb"]
    state["dinat.encoder.levels.0.layers.0.extra"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys \['dinat.encoder.levels.0.layers.0.attention.self.rpb'\]"
                                         r"; unexpected keys \['dinat.encoder.levels.0.layers.0.extra'\]"):
        DinatForImageClassification.from_pretrained(folder)
    # strict=False keeps transformers' way: the keys that are there load, the missing one keeps its initialization
    model = DinatForImageClassification.from_pretrained(folder, strict=False)
    loaded = model.state_dict()
    assert "dinat.encoder.levels.0.layers.0.extra" not in loaded
    for key, value in state.items():
        if key in loaded:
            assert torch.equal(loaded[key], value), key
    assert not torch.equal(loaded["dinat.encoder.levels.0.layers.0.attention.self.rpb"],
                           load_file(TINY / "model.safetensors")["dinat.encoder.levels.0.layers.0.attention.self.rpb"])


def test_invalid_config_json_is_named(tmp_path):
    folder = _copy_checkpoint(tmp_path)
    (folder / "config.json").write_text('{"model_type": "dinat", ')
    with pytest.raises(OSError, match="config.json"):
        DinatForImageClassification.from_pretrained(folder)
    raw = json.loads((TINY / "config.json").read_text())
    raw["dilations"] = [[1, 4], [1, 2], [2, 1]]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"invalid DiNAT config.json: .*dilations has 3 stages"):
        DinatForImageClassification.from_pretrained(folder)


class _RunsCode:
    """Pickles to a call of os.system: loading it with full unpickling would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_without_running(tmp_path):
    folder = _copy_checkpoint(tmp_path, CASES / "tiny_pad" / "model_bin")
    marker = tmp_path / "code-was-run"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["payload"] = _RunsCode(marker)
    torch.save(state, folder / "pytorch_model.bin")
    # sanity: the file really would run code under full unpickling (checked with pickle's opcodes, not by running)
    import pickletools
    import zipfile

    with zipfile.ZipFile(folder / "pytorch_model.bin") as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert any(op.name in ("GLOBAL", "STACK_GLOBAL") and "system" in str(arg)
               for op, arg, _ in pickletools.genops(data)) or b"system" in data
    with pytest.raises(ValueError, match=r"pytorch_model.bin: refused to load"):
        DinatForImageClassification.from_pretrained(folder)
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_only"):
        DinatForImageClassification.from_pretrained(folder, weights_only=False)
    assert not marker.exists()
