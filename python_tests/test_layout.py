"""The package's layout: parts as subpackages, modules of a readable size, no import cycle, and the old
import paths still working for one release."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "stn_ext")


def _modules():
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield (rel[:-len(".__init__")] if rel.endswith(".__init__") else rel), path


def _top_level_imports(name, path):
    """stn_ext modules imported when ``name`` is (module level: not inside functions)."""
    tree = ast.parse(open(path).read())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("stn_ext")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stn_ext"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from stn_ext.x import submodule`
    return out


def test_no_module_is_too_long():
    long = {name: n for name, path in _modules() if (n := sum(1 for _ in open(path))) > 530}
    assert not long, long


def test_no_import_cycle_between_modules():
    mods = dict(_modules())
    graph = {}
    for name, path in mods.items():
        deps = {d for d in _top_level_imports(name, path) if d in mods and d != name}
        # importing a package runs its __init__, so a module depends on the packages above it except its own
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
        if n in seen:
            return
        stack.append(n)
        for d in sorted(graph[n]):
            visit(d)
        stack.pop()
        seen.add(n)

    for n in sorted(graph):
        visit(n)


def test_every_module_imports():
    import importlib

    for name, _ in sorted(_modules()):
        if not name.endswith("__main__"):
            importlib.import_module(name)


def test_old_import_paths_still_work():
    import stn_ext.hyperparams
    import stn_ext.models
    import stn_ext.trainer
    from stn_ext import tuning
    from stn_ext.reversible import hypergradient  # noqa: F401

    assert stn_ext.trainer.train is tuning.train and stn_ext.trainer.TrainConfig is tuning.TrainConfig
    assert stn_ext.models is tuning.models and stn_ext.hyperparams is tuning.space
