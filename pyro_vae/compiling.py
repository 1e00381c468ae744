"""``torch.compile`` with an eager fallback and a compile-time account, for the trace-free loss and evaluation.

Pyro's traced objectives do not compile (Pyro's messages break the graph), so pyro-vae compiles the VAE's
trace-free particle twin plus an objective's formula (:class:`pyro_vae.training.ObjectiveModule`) or the twin's
log weights (:func:`pyro_vae.evaluation.log_likelihood`). Inductor's ``fallback_random`` keeps eager's random
numbers, so a compiled run draws the same noise and gives the same values and gradients as an eager one. On a
GPU, ``mode="reduce-overhead"`` adds CUDA graphs.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import torch

__all__ = ["Compiled"]


class Compiled:
    """``fn`` under :func:`torch.compile`; calls that compile (the first of each input shape) add their wall time
    to ``compile_seconds``. Where compiling fails (no C++ compiler, an unsupported platform or operation) the
    first call warns once, naming the error, and ``fn`` runs eagerly from then on (``compiled`` is False)."""

    def __init__(self, fn: Callable, cuda: bool = False):
        self.eager = fn
        self.compiled_fn = torch.compile(fn, mode="reduce-overhead" if cuda else None,
                                         options={"fallback_random": True})
        self.compiled = True
        self.compile_seconds = 0.0
        self._shapes: set = set()

    def __call__(self, *args, **kwargs):
        if not self.compiled:
            return self.eager(*args, **kwargs)
        key = tuple(tuple(a.shape) if torch.is_tensor(a) else a for a in _flat(args)) + tuple(sorted(kwargs.items()))
        if key in self._shapes:
            return self.compiled_fn(*args, **kwargs)
        start = time.perf_counter()
        try:
            result = self.compiled_fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            warnings.warn(f"torch.compile is unavailable here ({type(e).__name__}: {str(e).strip().splitlines()[0]}"
                          "); running eagerly instead", RuntimeWarning, stacklevel=2)
            self.compiled = False
            return self.eager(*args, **kwargs)
        self.compile_seconds += time.perf_counter() - start
        self._shapes.add(key)
        return result


def _flat(args) -> list:
    out = []
    for a in args:
        out.extend(_flat(a) if isinstance(a, (tuple, list)) else [a])
    return out
