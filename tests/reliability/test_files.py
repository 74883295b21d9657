"""Reliability of checkpoint files (issue 10, points 1 and 2): what is refused, what is guaranteed.

Table-driven: each row is (case, how the input is made, expected error and message, or expected result).
Saving: atomic swaps, refused targets, no stale weights, kept neighbours, permissions, stale staging, kills and
concurrent writers/readers with real processes. Loading: missing heads, dtype mismatches, and a message that
names the real cause of each bad file. docs/reliability.md ("Files") lists the same cases.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, tiny_model
from dinat import DinatBackbone, DinatConfig, DinatForImageClassification, DinatImageProcessor, DinatModel
from dinat import atomic
from dinat.cli import main as cli_main
from dinat.hub import CheckpointNotFoundError
from dinat.loading import CheckpointFileError, LoadWarning, MissingHeadError, NewHeadWarning, WeightDtypeError

SMALL = {**TINY, "num_labels": 4}
SHARD = "80KB"  # splits the small model (about 280 KB) into several shards


def small(value: float | None = None, **overrides) -> DinatForImageClassification:
    model = tiny_model(**{"num_labels": 4, **overrides}).eval()
    if value is not None:
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(value)
    return model


def saved(tmp_path: Path, model=None, name: str = "ckpt", **kwargs) -> Path:
    folder = tmp_path / name
    (model or small()).save_pretrained(folder, **kwargs)
    return folder


def weights_equal(folder: Path, model) -> bool:
    loaded = DinatForImageClassification.from_pretrained(folder)
    return all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# =================================================================================================
# Saving
# =================================================================================================
def sharded_over_unsharded(tmp_path):
    folder = saved(tmp_path)
    small(0.5).save_pretrained(folder, max_shard_size=SHARD)
    return folder


def unsharded_over_sharded(tmp_path):
    folder = saved(tmp_path, max_shard_size=SHARD)
    small(0.5).save_pretrained(folder)
    return folder


def processor_after_model(tmp_path):
    folder = saved(tmp_path, small(0.5))
    DinatImageProcessor(size=384).save_pretrained(folder)
    return folder


def model_after_processor_and_readme(tmp_path):
    folder = tmp_path / "ckpt"
    DinatImageProcessor(size=384).save_pretrained(folder)
    (folder / "README.md").write_text("model card")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("kept")
    small(0.5).save_pretrained(folder, max_shard_size=SHARD)
    small(0.5).save_pretrained(folder)
    return folder


SAVE_RESULTS = [
    # case, make(tmp_path) -> folder, files the folder must hold exactly (None: not checked), loads as small(0.5)
    ("sharded over unsharded leaves no model.safetensors", sharded_over_unsharded, None),
    ("unsharded over sharded leaves no shards or index", unsharded_over_sharded,
     ["config.json", "model.safetensors"]),
    ("processor save keeps the model files", processor_after_model,
     ["config.json", "model.safetensors", "preprocessor_config.json"]),
    ("model save keeps processor config, README and sub-folders", model_after_processor_and_readme,
     ["README.md", "config.json", "extra", "model.safetensors", "preprocessor_config.json"]),
]


@pytest.mark.parametrize("case, make, files", SAVE_RESULTS, ids=[row[0] for row in SAVE_RESULTS])
def test_save_result(tmp_path, case, make, files):
    folder = make(tmp_path)
    names = sorted(os.listdir(folder))
    if files is not None:
        assert names == files
    else:  # sharded: shards and index only
        assert "model.safetensors" not in names and "model.safetensors.index.json" in names
        assert any(n.startswith("model-00001-of-") for n in names)
    assert weights_equal(folder, small(0.5))
    assert not [p.name for p in tmp_path.iterdir() if ".dinat-staging-" in p.name or ".dinat-old-" in p.name]
    if (folder / "preprocessor_config.json").exists():
        assert DinatImageProcessor.from_pretrained(folder).input_size == (384, 384)
    if (folder / "extra").exists():
        assert (folder / "extra" / "notes.txt").read_text() == "kept"


def _save_into_file(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"precious")
    return target, lambda: small().save_pretrained(target), lambda: target.read_bytes() == b"precious"


def _processor_into_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    return target, lambda: DinatImageProcessor().save_pretrained(target), lambda: target.read_text() == "precious"


def _save_into_cwd(tmp_path, monkeypatch, target="."):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("precious")
    monkeypatch.chdir(work)
    return target, lambda: small().save_pretrained(target), lambda: (work / "data.txt").read_text() == "precious"


def _convert_into_cwd(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    source = work / "dinat_mini.pth"
    source.write_bytes(b"precious")
    monkeypatch.chdir(work)
    return ".", lambda: _cli(["convert", str(source), ".", "--overwrite"]), \
        lambda: source.read_bytes() == b"precious" and os.path.isdir(work)


def _convert_over_source(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    source = out / "dinat_mini.pth"
    source.write_bytes(b"precious")
    return out, lambda: _cli(["convert", str(source), str(out), "--overwrite"]), \
        lambda: source.read_bytes() == b"precious"


def _cli(argv):
    if cli_main(argv) != 0:
        raise ValueError("dinat command failed")


REFUSED_TARGETS = [
    # case, make(tmp_path, monkeypatch) -> (target, action, intact()), error type, message
    ("model save_pretrained to a file path", lambda t, m: _save_into_file(t), atomic.UnsafeTargetError,
     "is a file, not a folder"),
    ("processor save_pretrained to a file path", lambda t, m: _processor_into_file(t), atomic.UnsafeTargetError,
     "is a file, not a folder"),
    ("save_pretrained('.')", _save_into_cwd, atomic.UnsafeTargetError, "current working directory"),
    ("save_pretrained to a parent of the working directory",
     lambda t, m: _save_into_cwd(t, m, target=".."), atomic.UnsafeTargetError, "current working directory"),
    ("dinat convert X.pth . --overwrite", _convert_into_cwd, ValueError, "dinat command failed"),
    ("dinat convert out/X.pth out --overwrite", _convert_over_source, ValueError, "dinat command failed"),
]


@pytest.mark.parametrize("case, make, error, message", REFUSED_TARGETS, ids=[row[0] for row in REFUSED_TARGETS])
def test_refused_target(tmp_path, monkeypatch, capsys, case, make, error, message):
    target, action, intact = make(tmp_path, monkeypatch)
    with pytest.raises(error, match=message):
        action()
    assert intact(), "the target or the source was changed"
    if "convert" in case:
        assert "refusing to write" in capsys.readouterr().err


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o002, 0o775), (0o077, 0o700)])
def test_folder_mode_follows_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        folder = saved(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == mode


def test_stale_staging_of_dead_process_is_removed(tmp_path):
    folder = saved(tmp_path)
    pid = dead_pid()
    stale = tmp_path / f".ckpt.dinat-staging-{pid}-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / f".ckpt.dinat-staging-{os.getppid()}-00000000"  # a running process: left alone
    live.mkdir()
    small(0.5).save_pretrained(folder)
    assert not stale.exists() and live.exists()
    assert weights_equal(folder, small(0.5))


def test_interrupted_fallback_swap_is_restored_on_load(tmp_path):
    # the two-rename fallback killed between its renames: the old checkpoint is complete under its old name
    folder = saved(tmp_path, small(0.5))
    aside = tmp_path / f".ckpt.dinat-old-{dead_pid()}-0badc0de"
    folder.rename(aside)
    assert weights_equal(folder, small(0.5))
    assert not aside.exists()


def test_fallback_swap_without_rename_exchange(tmp_path, monkeypatch):
    folder = saved(tmp_path, small(0.25))
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    small(0.5).save_pretrained(folder, max_shard_size=SHARD)
    assert weights_equal(folder, small(0.5))
    assert "model.safetensors" not in os.listdir(folder)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".ckpt.dinat-lock"]


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    folder = saved(tmp_path, small(0.25))

    def fails(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(DinatConfig, "save_pretrained", fails)
    with pytest.raises(OSError, match="disk full"):
        small(0.5).save_pretrained(folder)
    monkeypatch.undo()
    assert weights_equal(folder, small(0.25))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".ckpt.dinat-lock"]


# -------------------------------------------------------------------------------------------------
# Real processes: killed writers, concurrent writers and readers
# -------------------------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, torch
    from dinat import DinatConfig, DinatForImageClassification
    target, value, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    config = DinatConfig(**{SMALL!r}, id2label={{i: f"v{{value:g}}" for i in range(4)}})
    model = DinatForImageClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    print("ready", flush=True)
    i = 0
    while rounds < 0 or i < rounds:
        # alternate sharded and unsharded saves: a stale or mixed file would show in the reader's check
        model.save_pretrained(target, max_shard_size="{SHARD}" if i % 2 else "50GB")
        i += 1
""").format(SMALL=SMALL, SHARD=SHARD)


def start_writer(target: Path, value: float, rounds: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(value), str(rounds)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def labelled(value: float) -> DinatForImageClassification:
    """small(value) with its value in the labels, as the writer processes save it."""
    return small(value, id2label={i: f"v{value:g}" for i in range(4)})


def assert_consistent(folder: Path, values: set[float]) -> float:
    """The folder loads, and its config and every weight come from one and the same save."""
    model = DinatForImageClassification.from_pretrained(folder)
    value = float(model.config.id2label[0][1:])
    assert value in values
    for key, tensor in model.state_dict().items():
        assert torch.all(tensor == value), f"{key} is not from the save of {value}: a mixed checkpoint"
    return value


def test_killed_writer_leaves_a_complete_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    labelled(0.0).save_pretrained(folder)
    rng = random.Random(0)
    for _ in range(3):
        writer = start_writer(folder, 1.0, rounds=-1)
        time.sleep(rng.uniform(0.05, 0.6))  # somewhere inside one of its saves
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert_consistent(folder, {0.0, 1.0})
    labelled(0.5).save_pretrained(folder)  # the next save cleans what the killed ones left
    assert_consistent(folder, {0.5})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".ckpt.dinat-lock"]


def test_two_writers_and_a_reader_never_mix(tmp_path):
    folder = tmp_path / "ckpt"
    labelled(1.0).save_pretrained(folder)
    writers = [start_writer(folder, 1.0, rounds=25), start_writer(folder, 2.0, rounds=25)]
    seen = set()
    try:
        while any(w.poll() is None for w in writers):
            seen.add(assert_consistent(folder, {1.0, 2.0}))
    finally:
        for writer in writers:
            writer.kill() if writer.poll() is None else None
            writer.wait()
    assert [w.returncode for w in writers] == [0, 0]
    assert_consistent(folder, {1.0, 2.0})
    assert seen  # the reader ran while they wrote


# =================================================================================================
# Loading
# =================================================================================================
def _classifier_without(prefixes):
    def make(tmp_path):
        folder = saved(tmp_path)
        state = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in state.items() if not k.startswith(prefixes)}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        return folder
    return make


def _backbone(tmp_path):
    folder = tmp_path / "backbone"
    DinatBackbone(DinatConfig(**SMALL)).save_pretrained(folder)
    return folder


def _with_dtype(dtype):
    def make(tmp_path):
        folder = saved(tmp_path)
        state = load_file(folder / "model.safetensors")
        key = "dinat.encoder.levels.0.layers.0.attention.self.rpb"
        state[key] = (state[key] > 0).to(dtype)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    return make


def _bin_of(make_safetensors):
    def make(tmp_path):
        folder = make_safetensors(tmp_path)
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
        return folder
    return make


def _bin_file(content: bytes):
    def make(tmp_path):
        folder = saved(tmp_path)
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(content)
        return folder
    return make


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo code-was-run > /dev/null",))


def _unsafe_pickle(tmp_path):
    folder = saved(tmp_path)
    (folder / "model.safetensors").unlink()
    state = small().state_dict()
    state["payload"] = _RunsCode()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def _truncated_safetensors(tmp_path):
    folder = saved(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def _weights_file_path(tmp_path):
    return saved(tmp_path) / "model.safetensors"


def _no_config(tmp_path):
    folder = saved(tmp_path)
    (folder / "config.json").unlink()
    return folder


def _weights_are_a_folder(tmp_path):
    folder = saved(tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()
    return folder


def _corrupt_index(tmp_path):
    folder = saved(tmp_path, max_shard_size=SHARD)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    return folder


def _missing_shard(tmp_path):
    folder = saved(tmp_path, max_shard_size=SHARD)
    next(folder.glob("model-00002-of-*.safetensors")).unlink()
    return folder


LOAD_ERRORS = [
    # case, make(tmp_path) -> path, from_pretrained kwargs, class, error type, message (regex)
    ("backbone checkpoint into the classifier", _backbone, {}, DinatForImageClassification, MissingHeadError,
     r"no classification head and final norm .* it is a DinatBackbone checkpoint"),
    ("classifier checkpoint without classifier.*", _classifier_without(("classifier.",)), {},
     DinatForImageClassification, MissingHeadError, r"no classification head for .*classifier.weight"),
    ("classifier checkpoint without the final norm", _classifier_without(("dinat.layernorm.",)), {},
     DinatForImageClassification, MissingHeadError, r"no final norm .*dinat.layernorm.weight"),
    ("backbone checkpoint into DinatModel (final norm missing)", _backbone, {}, DinatModel, MissingHeadError,
     r"no final norm"),
    ("int64 tensor for a float weight", _with_dtype(torch.int64), {}, DinatForImageClassification,
     WeightDtypeError, r"attention.self.rpb \(I64\)"),
    ("bool tensor for a float weight", _with_dtype(torch.bool), {}, DinatForImageClassification,
     WeightDtypeError, r"attention.self.rpb \(BOOL\)"),
    ("int64 tensor in a pytorch_model.bin", _bin_of(_with_dtype(torch.int64)), {}, DinatForImageClassification,
     WeightDtypeError, r"attention.self.rpb \(int64\)"),
    ("pytorch_model.bin of random bytes", _bin_file(bytes(random.Random(1).getrandbits(8) for _ in range(4096))),
     {}, DinatForImageClassification, CheckpointFileError, r"pytorch_model.bin: not a valid checkpoint"),
    ("pytorch_model.bin: pickle header, then garbage", _bin_file(b"\x80\x02" + b"\xff" * 500), {},
     DinatForImageClassification, CheckpointFileError, r"not a valid checkpoint: corrupt pickle data"),
    ("pytorch_model.bin: zip header, truncated", _bin_file(b"PK\x03\x04" + b"\0" * 500), {},
     DinatForImageClassification, CheckpointFileError, r"corrupt or truncated"),
    ("pickle that would run code", _unsafe_pickle, {}, DinatForImageClassification, CheckpointFileError,
     r"refused to load: the pickle holds more than tensors"),
    ("truncated safetensors", _truncated_safetensors, {}, DinatForImageClassification, CheckpointFileError,
     r"model.safetensors: corrupt or truncated safetensors file"),
    ("a weights file given instead of the folder", _weights_file_path, {}, DinatForImageClassification,
     NotADirectoryError, r"model.safetensors is a file; from_pretrained takes the checkpoint folder"),
    ("weights without config.json", _no_config, {}, DinatForImageClassification, FileNotFoundError,
     r"holds weights but no config.json"),
    ("model.safetensors is a folder", _weights_are_a_folder, {}, DinatForImageClassification, IsADirectoryError,
     r"model.safetensors is a folder, not a file"),
    ("corrupt shard index", _corrupt_index, {}, DinatForImageClassification, CheckpointFileError,
     r"corrupt shard index"),
    ("a shard listed in the index is missing", _missing_shard, {}, DinatForImageClassification, FileNotFoundError,
     r"model-00002-of-\d+.safetensors: no such file"),
    ("folder that does not exist", lambda t: t / "absent", {}, DinatForImageClassification,
     CheckpointNotFoundError, r"no such folder or file"),
]


@pytest.mark.parametrize("case, make, kwargs, cls, error, message", LOAD_ERRORS, ids=[r[0] for r in LOAD_ERRORS])
def test_load_error(tmp_path, case, make, kwargs, cls, error, message):
    path = make(tmp_path)
    with pytest.raises(error, match=message) as info:
        cls.from_pretrained(path, **kwargs)
    if error is CheckpointFileError and "random" in case:
        assert "would run code" not in str(info.value)


NEW_HEAD = [
    # case, make, kwargs, warning category, message, newly initialized keys
    ("backbone checkpoint with num_labels", _backbone, {"num_labels": 3}, NewHeadWarning, r"newly initialized",
     ("classifier.", "dinat.layernorm.")),
    ("missing classifier with ignore_mismatched_sizes", _classifier_without(("classifier.",)),
     {"ignore_mismatched_sizes": True}, NewHeadWarning, r"classifier.weight", ("classifier.",)),
    ("missing final norm with strict=False", _classifier_without(("dinat.layernorm.",)), {"strict": False},
     NewHeadWarning, r"dinat.layernorm.weight", ("dinat.layernorm.",)),
    ("int64 weight with strict=False", _with_dtype(torch.int64), {"strict": False}, LoadWarning, r"\(I64\)", ()),
]


@pytest.mark.parametrize("case, make, kwargs, category, message, new", NEW_HEAD, ids=[r[0] for r in NEW_HEAD])
def test_load_warning(tmp_path, case, make, kwargs, category, message, new):
    path = make(tmp_path)
    with pytest.warns(category, match=message):
        model = DinatForImageClassification.from_pretrained(path, **kwargs)
    checkpoint = load_file(path / "model.safetensors")
    for key, value in model.state_dict().items():  # everything but the new parts comes from the checkpoint
        stored = checkpoint.get(key, checkpoint.get(key.removeprefix("dinat.")))
        if key.startswith(new):
            assert stored is None, f"{key} is in the checkpoint"
        elif stored.is_floating_point():
            assert torch.equal(value, stored), key


def test_output_loading_info_reports_instead_of_raising(tmp_path):
    with pytest.warns(NewHeadWarning):
        model, info = DinatForImageClassification.from_pretrained(_backbone(tmp_path), output_loading_info=True)
    assert {"classifier.weight", "dinat.layernorm.weight"} <= set(info["missing_keys"])


UNREADABLE = [
    # case, what is made unreadable (relative to tmp_path), mode, message
    ("weights file", "parent/ckpt/model.safetensors", 0, "model.safetensors: permission denied"),
    ("checkpoint folder (not listable)", "parent/ckpt", 0o311, "permission denied"),
    ("parent folder (not traversable)", "parent", 0, "permission denied for"),
]


@pytest.mark.parametrize("case, path, mode, message", UNREADABLE, ids=[r[0] for r in UNREADABLE])
def test_unreadable_is_permission_denied_not_missing(tmp_path, case, path, mode, message):
    folder = saved(tmp_path / "parent")
    os.chmod(tmp_path / path, mode)
    code = textwrap.dedent(f"""
        from dinat import DinatForImageClassification
        try:
            DinatForImageClassification.from_pretrained({str(folder)!r})
        except PermissionError as err:
            print("PermissionError:", err)
    """)
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # root reads every file: run the load without the capabilities that allow it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        os.chmod(tmp_path / path, 0o755)
    assert "PermissionError:" in result.stdout and message in result.stdout, (result.stdout, result.stderr[-2000:])


# -------------------------------------------------------------------------------------------------
# The command line: predict and convert
# -------------------------------------------------------------------------------------------------
def _image(tmp_path):
    from PIL import Image

    path = tmp_path / "cat.png"
    Image.new("RGB", (40, 40), (200, 100, 50)).save(path)
    return path


def _corrupt_processor_config(tmp_path):
    folder = saved(tmp_path)
    DinatImageProcessor(size=64).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text('{"size": 64, ')
    return folder


CLI_ERRORS = [
    # case, make(tmp_path) -> argv, message on stderr, message that must NOT appear
    ("predict with a backbone checkpoint", lambda t: ["predict", str(_image(t)), "-m", str(_backbone(t))],
     "no classification head", None),
    ("predict with a corrupt preprocessor_config.json",
     lambda t: ["predict", str(_image(t)), "-m", str(_corrupt_processor_config(t))],
     "preprocessor_config.json (corrupt or unreadable", "has no preprocessor_config.json"),
    ("info with a corrupt preprocessor_config.json", lambda t: ["info", str(_corrupt_processor_config(t))],
     "preprocessor_config.json (corrupt or unreadable", None),
    ("convert a folder", lambda t: ["convert", str(saved(t)), str(t / "out")], "is a folder", "does not exist"),
    ("convert random bytes", lambda t: ["convert", str(_write(t / "x.pth", os.urandom(2000))), str(t / "out")],
     "not a valid checkpoint", "would run code"),
    ("convert a pickle that would run code",
     lambda t: ["convert", str(_write(t / "x.pth", _torch_bytes({"payload": _RunsCode()}))), str(t / "out")],
     "refused to load", None),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _torch_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case, make, message, absent", CLI_ERRORS, ids=[r[0] for r in CLI_ERRORS])
def test_cli_error(tmp_path, capsys, case, make, message, absent):
    argv = make(tmp_path)
    capsys.readouterr()
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert message in err
    if absent:
        assert absent not in err
    assert not (tmp_path / "out").exists()


def test_predict_shows_load_warnings_on_stderr(tmp_path, capsys, monkeypatch):
    from dinat.inference import load_classifier

    folder = _with_dtype(torch.int64)(tmp_path)
    with pytest.raises(WeightDtypeError):
        load_classifier(str(folder))
    # the same checkpoint loaded leniently by `dinat predict`: the loader's warning reaches stderr, not the
    # quieted logs
    original = DinatForImageClassification.from_pretrained
    monkeypatch.setattr(DinatForImageClassification, "from_pretrained",
                        lambda *args, **kwargs: original(*args, strict=False, **kwargs))
    cli_main(["predict", str(_image(tmp_path)), "-m", str(folder), "-k", "1"])
    err = capsys.readouterr().err
    assert "dinat: warning:" in err and "(I64)" in err


def test_json_of_saved_processor_is_complete(tmp_path):
    folder = tmp_path / "p"
    DinatImageProcessor(size=320).save_pretrained(folder)
    assert json.loads((folder / "preprocessor_config.json").read_text())["size"] == {"height": 320, "width": 320}
