import os
from pathlib import Path

import pytest
import torch

import pyro


@pytest.fixture(autouse=True)
def _pyro_state():
    """Every test starts from an empty param store, a fixed seed and Pyro's validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep tests from writing into the user's ~/.cache."""
    monkeypatch.setenv("PYRO_VAE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def mnist_root():
    """The folder holding MNIST/raw (``$PYRO_VAE_DATA``, or ../shared/data beside the checkout), or None."""
    candidates = [os.environ.get("PYRO_VAE_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists():
            return Path(c)
    return None


@pytest.fixture
def mnist_dir():
    root = mnist_root()
    if root is None:
        pytest.skip("MNIST files not found: set PYRO_VAE_DATA to a folder holding MNIST/raw/*.gz")
    return root


torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
