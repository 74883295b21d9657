"""Write docs/api.md, the API reference, from the docstrings of dinat's public objects.

    python docs/gen_api.py           # rewrite docs/api.md
    python docs/gen_api.py --check   # exit 1 if docs/api.md differs from the docstrings

The page lists the objects in SECTIONS in that order: each one's signature and docstring, with Google-style
sections (Args, Attributes, Returns, Yields, Raises, Example) rendered as Markdown. For a class, its own public
methods and properties that have a docstring follow it (inherited transformers methods are documented there).
tests/test_api_docs.py fails when the page is out of date.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import inspect
import re
import sys
from pathlib import Path

API_PAGE = Path(__file__).with_name("api.md")

# (section title, [dotted names]) in page order
SECTIONS = [
    ("Configuration", ["dinat.DinatConfig"]),
    ("Models", ["dinat.DinatPreTrainedModel", "dinat.DinatModel", "dinat.DinatForImageClassification",
                "dinat.DinatBackbone"]),
    ("Model outputs", ["dinat.modeling_dinat.DinatModelOutput", "dinat.modeling_dinat.DinatImageClassifierOutput",
                       "dinat.modeling_dinat.DinatEncoderOutput"]),
    ("Image processor", ["dinat.DinatImageProcessor"]),
    ("transformers integration", ["dinat.register_with_transformers"]),
    ("Neighborhood-attention ops", ["dinat.ops.na2d", "dinat.ops.na2d_packed", "dinat.ops.na2d_qk", "dinat.ops.na2d_av",
                                    "dinat.ops.use_backend", "dinat.ops.linear",
                                    "dinat.ops.layer_norm"]),
    ("Backends", ["dinat.ops.torch_backend.can_run", "dinat.ops.cpp_backend.can_run",
                  "dinat.ops.flex_backend.can_run", "dinat.ops.natten_backend.can_run"]),
    ("Checkpoint files", ["dinat.atomic.replace_checkpoint", "dinat.atomic.reading"]),
    ("Errors and warnings", ["dinat.config_validation.ConfigValueError", "dinat.config_validation.ConfigFileError",
                             "dinat.loading.CheckpointFileError", "dinat.loading.CheckpointMismatchError",
                             "dinat.loading.MissingHeadError", "dinat.loading.WeightDtypeError",
                             "dinat.loading.NewHeadWarning", "dinat.atomic.UnsafeTargetError"]),
]

SECTION_HEADERS = ("Args", "Attributes", "Returns", "Yields", "Raises", "Example")
_LISTED = ("Args", "Attributes", "Raises")  # sections of `name: description` items


def resolve(dotted: str):
    module_name, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def _escape(text: str) -> str:
    """Markdown-escape `*` outside inline code, so that shapes such as K*K stay literal."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(part if part.startswith("`") else part.replace("*", r"\*") for part in parts)


def _default(value) -> str:
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.ismodule(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', value.__name__)}".lstrip(".")
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    return repr(value)


def signature(obj, name: str) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params = []
    for param in sig.parameters.values():
        text = param.name
        if param.kind is param.VAR_POSITIONAL:
            text = "*" + text
        elif param.kind is param.VAR_KEYWORD:
            text = "**" + text
        if param.annotation is not param.empty:
            annotation = param.annotation if isinstance(param.annotation, str) else inspect.formatannotation(
                param.annotation)
            text += f": {annotation}"
        if param.default is not param.empty:
            text += f" = {_default(param.default)}"
        params.append(text)
    shown = f"{name}({', '.join(params)})"
    if sig.return_annotation is not sig.empty:
        ret = sig.return_annotation
        shown += f" -> {ret if isinstance(ret, str) else inspect.formatannotation(ret)}"
    return shown


def render_docstring(doc: str) -> list[str]:
    """Markdown lines for one docstring: paragraphs as text, Google sections as bold titles and item lists."""
    out: list[str] = []
    section = None
    item: list[str] | None = None

    def flush_item():
        nonlocal item
        if item:
            name, _, rest = item[0].partition(":")
            text = " ".join([rest.strip(), *item[1:]]).strip()
            out.append(f"- `{name.strip()}`: {_escape(text)}" if rest or not text else f"- {_escape(item[0])}")
        item = None

    for line in doc.splitlines():
        stripped = line.strip()
        header = stripped[:-1] if stripped.endswith(":") else None
        if header in SECTION_HEADERS and not line.startswith(" "):
            flush_item()
            section = header
            out += ["", f"**{section}**", ""]
            if section == "Example":
                out.append("```python")
            continue
        if section == "Example":
            if not stripped and out[-1] == "```python":
                continue
            out.append(line[4:] if line.startswith("    ") else line)
            continue
        if section in _LISTED:
            if not stripped:
                continue
            indent = len(line) - len(line.lstrip())
            if indent <= 4:  # a new item
                flush_item()
                item = [stripped]
            else:
                item.append(stripped)
            continue
        if section is not None and line.startswith("    "):
            line = line[4:]
        out.append(_escape(line.strip()) if section else _escape(line))
    flush_item()
    if section == "Example":
        while out and not out[-1].strip():
            out.pop()
        out.append("```")
    return out


def _members(cls) -> list[tuple[str, object]]:
    """The class's own public methods and properties that have a docstring, in source order."""
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if (isinstance(func, property) or inspect.isfunction(func)) and func.__doc__:  # its own, not inherited
            members.append((name, value))
    return members


def render_object(dotted: str) -> list[str]:
    obj = resolve(dotted)
    lines = []
    if inspect.isclass(obj):
        bases = ", ".join(b.__name__ for b in obj.__bases__ if b is not object)
        lines += [f"### class `{dotted}`" + (f"({bases})" if bases else ""), ""]
        if not issubclass(obj, BaseException):
            lines += ["```python", signature(obj, obj.__name__), "```", ""]
        lines += render_docstring(inspect.getdoc(obj) or "")
        for name, member in _members(obj):
            func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            if isinstance(func, property):
                lines += ["", f"#### property `{obj.__name__}.{name}`", ""]
                lines += render_docstring(inspect.getdoc(func))
                continue
            kind = "classmethod " if isinstance(member, classmethod) else ""
            lines += ["", f"#### {kind}`{obj.__name__}.{name}`", "", "```python",
                      signature(getattr(obj, name), name), "```", ""]
            lines += render_docstring(inspect.getdoc(func))
    else:
        lines += [f"### `{dotted}`", "", "```python", signature(obj, obj.__name__), "```", ""]
        lines += render_docstring(inspect.getdoc(obj) or "")
    return lines


def render() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings by `python docs/gen_api.py` (do not edit by hand; "
             "`tests/test_api_docs.py` checks it is current). Shapes: B batch, H/W height/width, C channels, "
             "D head dim, K kernel size.", ""]
    for title, _ in SECTIONS:
        anchor = re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")
        lines.append(f"- [{title}](#{anchor})")
    for title, names in SECTIONS:
        lines += ["", f"## {title}"]
        for dotted in names:
            lines += [""] + render_object(dotted)
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/api.md is current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = API_PAGE.read_text(encoding="utf-8") if API_PAGE.exists() else ""
        if current != text:
            print(f"{API_PAGE} is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    API_PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {API_PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
