r"""Capture: any Pyro model and guide, with an objective, recorded once into one graph and compiled.

Pyro runs a model through Python effect handlers on every call: that is what makes it general, and what makes a
traced step several times slower than the same maths written in plain PyTorch. :class:`Captured` runs the
program once under :func:`torch.fx.experimental.proxy_tensor.make_fx`, which records every tensor operation it
performs (Pyro's handlers, the objective's formula, the gradient hooks of DReG/STL and, for a training step, the
backward pass of :func:`torch.autograd.grad`) as one graph of aten operations, and hands that graph to
TorchInductor. Later calls with the same input signature run the compiled graph: no Python, no Pyro, the
speed of hand-written code from the model as written.

What the graph keeps from the program:

* **Parameters are inputs, read live.** The parameters and buffers the program reads are passed in as graph
  inputs on every call (make_fx's real tracing mode attaches its proxies to those very tensors, so the model's
  own ``self.decoder(z)`` reads them), so an optimizer's in-place update is seen by the next call.
* **Noise is drawn inside the graph** from torch's global generator (``aten.normal`` and friends are graph
  operations; Inductor's ``fallback_random`` keeps eager's kernels), so a captured run draws what an eager run
  draws, and checkpoint/resume stays bit-exact. The capturing call itself restores the generator's state.
* **Shapes are fixed.** A graph is recorded per input signature (shapes, dtypes, devices, and the plain values
  of non-tensor arguments); a partial last batch gets its own graph.
* **Data-dependent Python is refused.** A host read of a traced tensor (``.item()``, ``bool(t)``, a Python
  ``if`` on a tensor) makes capture fail; the call then runs eagerly and one line on stderr names the cause.
  Python control flow on shapes or on other Python values is recorded as the branch taken at capture time:
  like :func:`torch.jit.trace`, a model whose structure changes between calls of equal shapes (a random number
  of sites, a branch on a global flag) is the user's responsibility; build a new :class:`Captured` after such a
  change.

Why make_fx and not aot_autograd or torch.export (docs/scale.md, "How capture works"): the training step's
gradient estimators are not plain autograd of a loss (DReG rescales the gradient reaching z with a tensor hook,
STL stops gradients inside log q), so the backward pass must be the program's own ``torch.autograd.grad``, run
and recorded, not a joint graph derived from a forward; make_fx records exactly that in one pass, and Pyro's
Python (messages, plates, distributions) runs once, at capture. Non-strict ``torch.export`` needs an
``nn.Module.forward`` and still derives the backward itself; aot_autograd derives it too.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Callable, Sequence

import torch

import pyro
from pyro.util import get_rng_state, set_rng_state

__all__ = ["Captured", "signature", "gradient_program"]


def signature(args) -> tuple:
    """The key of one graph: per tensor its shape, dtype, device and requires_grad; other values as they are."""
    key = []
    for a in args:
        if torch.is_tensor(a):
            key.append((tuple(a.shape), a.dtype, a.device, a.requires_grad))
        elif isinstance(a, (tuple, list)):
            key.append(signature(a))
        else:
            key.append(a)
    return tuple(key)


def _one_line(e: BaseException) -> str:
    """``Type: first line of the message (at file:line)``, the place being the innermost frame of the traceback
    outside torch: where the program did what no graph records (a host read, a Python branch on a tensor)."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 160:
        first = first[:157] + "..."
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(e).__name__}: {first}{where}".strip()


class Captured:
    """``fn(*args)`` recorded into one aten graph per input signature and compiled with TorchInductor.

    Args:
        fn: the program, a function of tensors (and plain values) returning a tensor or a tuple of tensors.
        tensors: a callable returning the parameters and buffers ``fn`` reads (they become graph inputs, read
            live on every call).
        compile: compile the recorded graph with Inductor (else the graph runs as recorded, op by op).
        prepare: a cheaper stand-in for ``fn`` (e.g. the loss without its gradients), called once eagerly
            without gradients before each recording (default: ``fn`` itself), the generator's state restored:
            what a program does only on its first call (an objective guessing the model's plate nesting by a
            dry run, whose undone draws must not enter the graph) happens there.
        cuda_graphs: on a GPU, replay the compiled graph with CUDA graphs (Inductor's ``triton.cudagraphs``).
        name: what the one-line fallback message calls this program.
        constants: a callable returning the plain values ``fn`` reads that a recording freezes into the graph
            (an objective's ``num_particles``, ``estimator``, ``alpha``): they join each graph's key, so after
            one changes the next call records a graph of its own instead of replaying one that computes the old
            value.

    Attributes: ``capture_seconds`` and ``compile_seconds`` (wall time spent recording and compiling, summed
    over the signatures seen), ``graphs`` (signature -> compiled callable), ``fallback`` (the cause, once capture
    or compilation failed and ``fn`` runs eagerly from then on), ``num_nodes`` (of the last graph recorded).
    """

    def __init__(self, fn: Callable, tensors: Callable[[], Sequence[torch.Tensor]], *, prepare: Callable | None = None,
                 compile: bool = True, cuda_graphs: bool = False, name: str = "the step",
                 constants: Callable[[], tuple] | None = None):
        self.fn, self.tensors, self.prepare, self.name = fn, tensors, prepare, name
        self.constants = constants
        self.compile, self.cuda_graphs = compile, cuda_graphs
        self.graphs: dict = {}
        self.capture_seconds = self.compile_seconds = 0.0
        self.fallback: str | None = None
        self.num_nodes = 0

    @property
    def captured(self) -> bool:
        """Whether calls run on recorded graphs (False after a fallback to eager)."""
        return self.fallback is None

    def __call__(self, *args):
        if self.fallback is not None:
            return self.fn(*args)
        key = signature(args) + ((("constants",) + tuple(self.constants()),) if self.constants else ())
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self.graphs[key] = self._build(args)
            except Exception as e:  # noqa: BLE001 - whatever breaks capture or the compiler: run eagerly
                self.fallback = _one_line(e)
                print(f"pyro-vae: could not capture {self.name} into a graph ({self.fallback}); running eagerly",
                      file=sys.stderr)
                return self.fn(*args)
        tensors = [t.detach() for t in self.tensors()]
        return graph(tensors + _tensor_args(args))

    # ------------------------------------------------------------------------------------------ building
    def _build(self, args) -> Callable:
        """Record ``fn`` on ``args`` (the generator's state restored afterwards), then compile the graph.
        Returns ``run(inputs)``, giving ``fn``'s result (a tensor or a tuple) for the graph inputs."""
        from torch.fx.experimental.proxy_tensor import make_fx

        tensors = list(self.tensors())
        positions = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        returns_tuple = []

        def program(*inputs):
            call_args = list(args)
            for i, t in zip(positions, inputs[len(tensors):]):
                call_args[i] = t
            out = self.fn(*call_args)
            returns_tuple.append(isinstance(out, tuple))
            return tuple(out) if isinstance(out, tuple) else (out,)

        start, rng = time.perf_counter(), get_rng_state()
        try:
            with pyro.validation_enabled(False):
                # one eager call first: what a program does only once (an objective guessing the model's plate
                # nesting by a dry run, registering parameters) stays out of the graph
                if self.prepare is not None:
                    with torch.no_grad():
                        self.prepare(*args)
                else:
                    self.fn(*args)
                set_rng_state(rng)
                graph = make_fx(program)(*tensors, *_tensor_args(args))
        finally:
            set_rng_state(rng)
        self.capture_seconds += time.perf_counter() - start
        self.num_nodes = len(graph.graph.nodes)
        example = [t.detach() for t in tensors] + _tensor_args(args)
        compiled = self._compile(graph, example) if self.compile else (lambda inputs: graph(*inputs))
        if returns_tuple[0]:
            return lambda inputs: tuple(compiled(inputs))
        return lambda inputs: compiled(inputs)[0]

    def _compile(self, graph, example_inputs) -> Callable:
        """Inductor on the recorded graph: ``run(inputs)`` -> the graph's outputs."""
        from torch._inductor import config as inductor_config

        start = time.perf_counter()
        options = {"fallback_random": True}
        if self.cuda_graphs:
            options["triton.cudagraphs"] = True
        with inductor_config.patch(options):
            compiled = torch._inductor.compile(graph, example_inputs)
        self.compile_seconds += time.perf_counter() - start
        return lambda inputs: compiled(*inputs)


def _tensor_args(args) -> list:
    return [a for a in args if torch.is_tensor(a)]


def gradient_program(loss_fn: Callable, params: Sequence[torch.Tensor]) -> Callable:
    """``step(*batch) -> (loss, *grads)``: the loss of a minibatch and the gradient of loss / B (B = the batch's
    first dimension) with respect to each of ``params`` (zeros for a parameter the loss does not reach): what a
    training step computes before the optimizer's update, as one function to capture."""
    params = list(params)

    def step(*batch):
        loss = loss_fn(*batch)
        grads = torch.autograd.grad(loss / batch[0].shape[0], params, allow_unused=True)
        return (loss.detach(),) + tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))

    return step
