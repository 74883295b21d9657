"""docs/api.md is generated from the docstrings (docs/gen_api.py): it must match them, and the public ops it
documents must state their arguments and results."""

import importlib.util
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_api = _load_generator()


def test_api_page_matches_the_docstrings():
    current = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert current == gen_api.render(), "docs/api.md is out of date: run python docs/gen_api.py"


def test_every_listed_object_exists_and_is_documented():
    for _, names in gen_api.SECTIONS:
        for dotted in names:
            assert inspect.getdoc(gen_api.resolve(dotted)), f"{dotted} has no docstring"


OPS = [name for title, names in gen_api.SECTIONS if title in ("Neighborhood-attention ops", "Backends")
       for name in names]
# docstrings that live in files of the ops-speed work (ops/linear.py, ops/torch_backend.py), still one line
@pytest.mark.parametrize("dotted", OPS)
def test_public_ops_state_args_and_results(dotted):
    doc = inspect.getdoc(gen_api.resolve(dotted))
    assert "\nArgs:\n" in doc, f"{dotted}: no Args section"
    assert "\nReturns:\n" in doc or "\nYields:\n" in doc, f"{dotted}: no Returns section"
    documented = {line.split(":")[0].strip().lstrip("*") for line in doc.split("\nArgs:\n")[1].splitlines()
                  if line.startswith("    ") and not line.startswith("        ") and ":" in line}
    parameters = set(inspect.signature(gen_api.resolve(dotted)).parameters)
    assert parameters <= documented, f"{dotted}: undocumented arguments {sorted(parameters - documented)}"


def test_the_renderer_turns_google_sections_into_markdown():
    doc = inspect.cleandoc("""Summary with K*K and `a*b`.

        Args:
            x: first line
                continued.
            **kwargs: passed on.

        Returns:
            (B, C) values.
        """)
    assert gen_api.render_docstring(doc) == [
        r"Summary with K\*K and `a*b`.", "", "", "**Args**", "", "- `x`: first line continued.",
        r"- `**kwargs`: passed on.", "", "**Returns**", "", "(B, C) values."]
