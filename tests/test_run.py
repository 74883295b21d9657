"""`python -m dinat.run`: third-party transformers scripts get this package's DiNAT through the Auto classes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import tiny_model

SCRIPT = textwrap.dedent("""
    import sys

    from transformers import AutoModelForImageClassification

    print("name", __name__)
    print("argv", sys.argv)
    model = AutoModelForImageClassification.from_pretrained(sys.argv[1])
    print("class", type(model).__module__, type(model).__name__)
    sys.exit(int(sys.argv[2]))
""")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model().save_pretrained(path)
    return path


def run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_script_runs_as_main_with_its_argv_exit_status_and_folder(tmp_path, checkpoint):
    # a fresh interpreter, as a user runs it; the script imports a module next to it, from another folder
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "helper.py").write_text("VALUE = 42\n")
    (tmp_path / "scripts" / "train.py").write_text("import helper\nprint('helper', helper.VALUE)\n" + SCRIPT)
    result = run(["-m", "dinat.run", "scripts/train.py", str(checkpoint), "3"], cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "helper 42" in lines and "name __main__" in lines
    assert f"argv ['scripts/train.py', '{checkpoint}', '3']" in lines
    assert "class dinat.modeling_dinat DinatForImageClassification" in lines


def test_without_the_runner_transformers_wants_natten(tmp_path, checkpoint):
    # what the runner is for: transformers' own DiNAT refuses to build without NATTEN, and fails to import with
    # NATTEN >= 0.20 (it imports ops NATTEN removed); either way the error names NATTEN
    (tmp_path / "train.py").write_text(SCRIPT)
    result = run(["train.py", str(checkpoint), "0"], cwd=tmp_path)
    assert result.returncode != 0 and "natten" in result.stderr.lower()


def test_module_mode(tmp_path, checkpoint, monkeypatch, capsys):
    from dinat.run import main

    package = tmp_path / "tools"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "finetune.py").write_text(SCRIPT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.delitem(sys.modules, "tools", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["-m", "tools.finetune", str(checkpoint), "5"])
    assert exit_info.value.code == 5
    lines = capsys.readouterr().out.splitlines()
    assert "name __main__" in lines
    assert f"argv ['{package / 'finetune.py'}', '{checkpoint}', '5']" in lines
    assert "class dinat.modeling_dinat DinatForImageClassification" in lines


@pytest.mark.parametrize("args, message", [([], "usage: python -m dinat.run"),
                                           (["missing.py"], "can't open file 'missing.py'"),
                                           (["-m"], "-m needs a module name")])
def test_bad_invocations_are_clear_errors(tmp_path, monkeypatch, capsys, args, message):
    from dinat.run import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
