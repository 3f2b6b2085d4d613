"""The scripts in bench/ as modules, for the tests that run them (bench/ is not a package)."""
import importlib.util
import os

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def load(name):
    """bench/<name>.py, freshly executed (its module-level state, such as bench_tuning.OVERRIDES, starts empty)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
