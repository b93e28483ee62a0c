"""Build ``docs/api.md``, the API reference, from the package's docstrings.

Plain Python (``inspect``), no dependencies beyond the package itself::

    python docs/build.py            # (re)write docs/api.md
    python docs/build.py --check    # exit 1 if docs/api.md is not what the docstrings give

The page is ``docs/guide.md`` (hand-written: choosing the step, what
``reversible=True`` costs, which path supports what, deploying) followed by one
section per public name in :data:`PUBLIC`, in that order. ``make docs`` runs it;
``python_tests/test_docs.py`` checks that the page is up to date, that every
public name and parameter is documented, and that every example runs.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "api.md")
GUIDE = os.path.join(HERE, "guide.md")

# (heading, module, names): the public API, in the order of the page.
PUBLIC = [
    ("Dense stacks", "stablenets_ext",
     ["ResNetStack", "AntisymmetricStack", "LeapfrogStack", "VerletStack"]),
    ("Convolutional stacks", "stablenets_ext",
     ["ConvResNetStack", "ConvAntisymmetricStack", "ConvLeapfrogStack", "ConvVerletStack"]),
    ("Models", "stablenets_ext", ["StableNet", "double_layers"]),
    ("Training", "stablenets_ext.training",
     ["train", "train_multilevel", "evaluate", "TrainConfig", "load_trainer", "preset"]),
    ("Parallel trainers", "stablenets_ext.training.sg", ["train_sg"]),
    ("Parallel trainers", "stablenets_ext.training.pvd", ["train_pvd"]),
    ("Data", "stablenets_ext.data", ["load_dataset", "Dataset"]),
    ("Functional forms", "stablenets_ext.functional",
     ["resnet", "antisymmetric", "leapfrog", "verlet"]),
    ("Functional conv forms", "stablenets_ext.conv",
     ["conv_resnet", "conv_antisymmetric", "conv_leapfrog", "conv_verlet"]),
    ("Reference implementation", "stablenets_ext.reference",
     ["resnet", "antisymmetric", "leapfrog", "verlet", "activation_fn", "antisymmetric_weight"]),
    ("Install", "stablenets_ext", ["info"]),
]

MODULE_HOOKS = {"extra_repr"}  # nn.Module's own protocol: documented by torch
SECTION = re.compile(r"^(Args|Arguments|Returns|Raises|Example|Examples|Note):\s*$")


def public_objects():
    """``[(heading, qualified name, object)]`` for every name in :data:`PUBLIC`."""
    out = []
    for heading, module, names in PUBLIC:
        mod = importlib.import_module(module)
        for name in names:
            out.append((heading, f"{module}.{name}", getattr(mod, name)))
    return out


def own_methods(cls):
    """Public methods a package class defines itself (``forward`` and the like), in
    definition order, ``__init__`` excluded."""
    seen, out = set(), []
    for klass in cls.__mro__:
        if not klass.__module__.startswith("stablenets_ext"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in seen or name in MODULE_HOOKS:
                continue
            seen.add(name)
            if isinstance(value, classmethod):
                value = value.__func__
            if inspect.isfunction(value):
                out.append((name, value))
    return sorted(out, key=lambda nv: (nv[0] != "forward", nv[1].__code__.co_firstlineno))


def signature(obj, drop_self=False) -> str:
    sig = inspect.signature(obj)
    params = list(sig.parameters.values())
    if drop_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    params = [p.replace(annotation=inspect.Parameter.empty) for p in params]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def params(obj, drop_self=False) -> list[str]:
    names = list(inspect.signature(obj).parameters)
    if drop_self and names and names[0] in ("self", "cls"):
        names = names[1:]
    return names


def documented_args(doc: str) -> set[str]:
    """Names listed in the ``Args:`` section of a docstring (``name (type): ...`` or
    ``name: ...``)."""
    names, inside, indent = set(), False, None
    for line in inspect.cleandoc(doc or "").splitlines():
        if SECTION.match(line.strip()) and not line.startswith(" "):
            inside, indent = line.strip().startswith("Arg"), None
            continue
        if not inside or not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width == indent:
            m = re.match(r"\s*\**(\w+)\**\s*(\(|:)", line)
            if m:
                names.add(m.group(1))
        elif width < indent:
            inside = False
    return names


def _markdown(doc: str) -> str:
    """A Google-style docstring as Markdown: sections as bold headings, ``Args`` entries
    as a list, doctest examples as fenced ``pycon`` blocks."""
    lines = inspect.cleandoc(doc or "").splitlines()
    out, i, section = [], 0, None
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if SECTION.match(stripped) and not line.startswith(" "):
            section = stripped[:-1]
            out += ["", f"**{section}:**", ""]
            i += 1
            continue
        if stripped.startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i].strip() if lines[i].strip().startswith(("...", ">>>"))
                             else lines[i].strip())
                i += 1
            out += ["```pycon", *block, "```"]
            continue
        if section in ("Args", "Arguments", "Raises") and stripped:
            # an entry and its continuation lines -> one list item
            entry = [stripped]
            indent = len(line) - len(line.lstrip())
            i += 1
            while i < len(lines) and lines[i].strip() and \
                    len(lines[i]) - len(lines[i].lstrip()) > indent:
                entry.append(lines[i].strip())
                i += 1
            text = " ".join(entry)
            m = re.match(r"(\w+)(\s*\([^)]*\))?:\s*(.*)", text)
            out.append(f"- `{m.group(1)}`{m.group(2) or ''}: {m.group(3)}" if m else f"- {text}")
            continue
        out.append(stripped if section in ("Returns",) else line)
        i += 1
    return "\n".join(out).strip() + "\n"


def render() -> str:
    with open(GUIDE) as f:
        parts = [f.read().rstrip() + "\n"]
    parts.append("\n# Reference\n\nGenerated by `docs/build.py` from the docstrings "
                 "(`make docs`); do not edit by hand.\n")
    heading = None
    for head, qualname, obj in public_objects():
        if head != heading:
            parts.append(f"\n## {head}\n")
            heading = head
        if inspect.isclass(obj):
            parts.append(f"\n### `{qualname}{signature(obj.__init__, drop_self=True)}`\n")
            parts.append(_markdown(obj.__doc__))
            init_doc = obj.__init__.__doc__
            if init_doc and obj.__init__.__qualname__.split(".")[0] != "Module":
                if documented_args(init_doc):
                    parts.append("\n" + _markdown(init_doc))
            for name, meth in own_methods(obj):
                parts.append(f"\n#### `{obj.__name__}.{name}{signature(meth, drop_self=True)}`\n")
                parts.append(_markdown(meth.__doc__))
        else:
            parts.append(f"\n### `{qualname}{signature(obj)}`\n")
            parts.append(_markdown(obj.__doc__))
    text = "\n".join(parts)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if docs/api.md differs from what the docstrings give")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    text = render()
    if args.check:
        with open(OUT) as f:
            if f.read() != text:
                print("docs/api.md is out of date: run `make docs` (python docs/build.py)",
                      file=sys.stderr)
                return 1
        return 0
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
