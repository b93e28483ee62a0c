"""The shape issue 13 asks for, checked: no import cycle among the trainers,
the runtime and the CLI; no module importing another module's private names;
every registered trainer exposing the trainer interface."""

import ast
import dataclasses
import os

import pytest

from stablenets_ext import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "stablenets_ext")


def _modules():
    mods = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(mods):
    """{module: {(imported module, name)}} for imports inside stablenets_ext."""
    out = {}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        found = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("stablenets_ext"):
                    for alias in node.names:
                        found.add((target, alias.name))
        out[mod] = found
    return out


def test_no_import_cycles_in_training_and_cli():
    mods = _modules()
    scope = ("stablenets_ext.training", "stablenets_ext.cli")
    graph = {m: set() for m in mods if m.startswith(scope)}
    for mod, found in _imports(mods).items():
        if mod not in graph:
            continue
        for target, name in found:
            sub = f"{target}.{name}"
            dest = sub if sub in mods else target
            if dest in graph and dest != mod:
                graph[mod].add(dest)
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in seen:
            return
        stack.append(m)
        for n in graph[m]:
            visit(n)
        stack.pop()
        seen.add(m)

    for m in graph:
        visit(m)


def test_no_private_names_imported_across_modules():
    mods = _modules()
    bad = [(mod, target, name) for mod, found in _imports(mods).items()
           for target, name in found
           if name.startswith("_") and not name.startswith("__") and f"{target}.{name}" not in mods]
    assert bad == [] or all(name == "_C" for _, _, name in bad), bad


@pytest.mark.parametrize("name", list(training.TRAINERS))
def test_every_trainer_exposes_the_interface(name):
    trainer = training.load_trainer(name)
    assert dataclasses.is_dataclass(trainer.Options)
    assert isinstance(trainer.ENGINES, dict) and trainer.ENGINES
    assert callable(trainer.fit)
    assert set(trainer.UNSUPPORTED) <= {f.name for f in dataclasses.fields(training.TrainConfig)}
    if trainer.COMPARISONS:
        assert callable(trainer.compare)
    trainer.Options().check()
