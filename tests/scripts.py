"""Helpers shared by the tests that run the examples and benchmarks (scripts, not modules of the package)."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(path):
    """Import a script (``examples/*.py``, ``benchmarks/*.py``) as a module named after its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def assert_learned(gain: dict, what: str) -> None:
    """``gain`` = {mean, stderr} over held-out points of a paired per-point difference in ELBO or log p(x), nats
    (e.g. trained minus untrained): the mean exceeds 3 of its standard errors."""
    assert gain["stderr"] > 0 and gain["mean"] > 3 * gain["stderr"], \
        f"{what}: gain {gain['mean']:.3f} ± {gain['stderr']:.3f} nats per point, not above 3 standard errors"
