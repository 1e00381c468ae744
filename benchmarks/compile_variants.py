"""What compiling can gain on one small training step: ways of compiling the step against the hand-written step.

The speed target of issue 14 asks ``fit(compile=True)`` to be 1.25x faster than the hand-written eager step
at batch 20 on one CPU thread. This script measures what each way of compiling the step gives there, and a
floor: the step's matrix products and its fused Adam update, timed alone. No implementation that keeps those
kernels (the same network, the same optimizer) can run faster than the floor.

Variants, every one with the same 784-400-20 MLP VAE, ELBO, one fixed binarized batch and fused Adam unless
named otherwise; they run interleaved in one process (blocks of ``--steps`` steps in turn, ``--rounds``
rounds), and the table shows the median ms per step and hand-written / variant:

* ``hand``: the hand-written eager step (the reference);
* ``fit``: ``fit``'s eager step (the twin plus the formula, ``guarded_step``);
* ``fit --compile``: ``fit``'s compiled step (the loss under ``torch.compile``, eager backward engine and Adam);
* ``hand, loss compiled``: the hand-written loss under ``torch.compile``;
* ``+ compiled Adam``: ``fit --compile`` with ``torch.compile(optimizer.step)`` of a single-tensor Adam
  (inductor writes the update);
* ``whole step compiled``: the hand-written step (loss, backward, Adam) under one ``torch.compile`` with compiled
  autograd on: the loss, and the backward by compiled autograd, run compiled; ``zero_grad`` and the fused Adam
  update (which torch does not trace) run eagerly between graph breaks;
* ``floor``: the step's seven matrix products (addmm/mm at the step's shapes) plus one fused Adam update.

    python benchmarks/compile_variants.py --threads 1 --batch 20
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

import pyro

import pyro_vae
from pyro_vae.training import ObjectiveModule, TrainState, guarded_step, make_adam

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import H, Z, cpu_name, hand_loss  # noqa: E402


def _hand_step(vae, opt, loss_fn, batch):
    def step(x):
        loss = loss_fn(vae, x)
        opt.zero_grad(set_to_none=True)
        (loss / batch).backward()
        opt.step()
        return loss.detach()
    return step


def _fit_step(vae, compile: bool, adam=None):
    module = ObjectiveModule(vae, pyro_vae.make_objective("elbo"), compile=compile)
    opt = adam or make_adam(list(vae.parameters()), 1e-3, torch.device("cpu"))
    state = TrainState(vae, module.objective, opt, module, torch.Generator(), torch.device("cpu"))
    return lambda x: guarded_step(state, (x,), "check")


def _floor(vae, batch):
    """The step's matrix products (forward and backward of the two 784x400 layers and the small ones) and one
    fused Adam update, with nothing else."""
    enc1, enc2 = vae.encoder.net[0], vae.encoder.net[2]
    dec1, dec2 = vae.decoder.net[0], vae.decoder.net[2]
    x, h = torch.rand(batch, 784), torch.rand(batch, H)
    g_out, g_h, g_mu = torch.rand(batch, 784), torch.rand(batch, H), torch.rand(batch, 2 * Z)
    z = torch.rand(batch, Z)
    params = [p.detach().clone() for p in vae.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = make_adam(params, 1e-3, torch.device("cpu"))

    def step(_):
        with torch.no_grad():
            torch.addmm(enc1.bias, x, enc1.weight.t())          # encoder forward
            torch.addmm(enc2.bias, h, enc2.weight.t())
            torch.addmm(dec1.bias, z, dec1.weight.t())          # decoder forward
            torch.addmm(dec2.bias, h, dec2.weight.t())
            torch.mm(g_out.t(), h)                              # decoder backward: weight and input gradients
            torch.mm(g_out, dec2.weight)
            torch.mm(g_h.t(), z)
            torch.mm(g_mu.t(), h)                               # encoder backward
            torch.mm(g_mu, enc2.weight)
            torch.mm(g_h.t(), x)
        opt.step()
    return step


def variants(batch):
    torch.manual_seed(0)
    vae = pyro_vae.VAE(input_shape=(1, 28, 28), z_dim=Z, hidden=(H,))
    loss = hand_loss("elbo", {})
    out = {}
    v = copy.deepcopy(vae)
    out["hand"] = _hand_step(v, make_adam(list(v.parameters()), 1e-3, torch.device("cpu")), loss, batch)
    out["fit"] = _fit_step(copy.deepcopy(vae), compile=False)
    out["fit --compile"] = _fit_step(copy.deepcopy(vae), compile=True)
    v = copy.deepcopy(vae)
    out["hand, loss compiled"] = _hand_step(v, make_adam(list(v.parameters()), 1e-3, torch.device("cpu")),
                                            torch.compile(loss, options={"fallback_random": True}), batch)
    v = copy.deepcopy(vae)
    adam = torch.optim.Adam(v.parameters(), lr=1e-3, foreach=False)  # (a compiled foreach Adam fails here)
    adam.step = torch.compile(adam.step)
    out["+ compiled Adam"] = _fit_step(v, compile=True, adam=adam)
    v = copy.deepcopy(vae)
    whole = torch.compile(_hand_step(v, make_adam(list(v.parameters()), 1e-3, torch.device("cpu")), loss, batch),
                          options={"fallback_random": True})
    out["whole step compiled"] = whole  # (main turns compiled autograd on for the run)
    out["floor"] = _floor(vae, batch)
    return out


def _run(steps, times, x, args):
    """Warm up (compile) each variant, drop those that fail, then time blocks of steps in turn."""
    with pyro.validation_enabled(False):
        for name, step in list(steps.items()):  # warm-up, compiles
            t = time.perf_counter()
            try:
                for _ in range(3):
                    step(x)
            except Exception as e:  # noqa: BLE001 - a variant this torch cannot compile is reported, not fatal
                print(f"  {name}: failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})", flush=True)
                del steps[name], times[name]
                continue
            print(f"  {name}: first steps {time.perf_counter() - t:.1f} s", flush=True)
        for _ in range(args.rounds):
            for name, step in steps.items():
                t = time.perf_counter()
                for _ in range(args.steps):
                    step(x)
                times[name].append((time.perf_counter() - t) / args.steps * 1e3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=60)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"device: {cpu_name()}, torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}", flush=True)
    x = torch.bernoulli(torch.rand(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.4)
    steps = variants(args.batch)
    times = {name: [] for name in steps}
    compiled_autograd = torch._dynamo.config.compiled_autograd
    torch._dynamo.config.compiled_autograd = True  # a .backward() inside a compiled region runs compiled too
    try:
        _run(steps, times, x, args)
    finally:
        torch._dynamo.config.compiled_autograd = compiled_autograd
        torch.set_flush_denormal(False)  # (what fit leaves behind too)
    hand = statistics.median(times["hand"])
    print("\n| variant | ms per step | hand-written / variant |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {hand / statistics.median(ts):.2f}x |")
    return {name: statistics.median(ts) for name, ts in times.items()}


if __name__ == "__main__":
    main()
