"""Where the eager step's fixed cost goes: the particle core's loss against the hand-written one, and the trainer.

Two measurements, interleaved in one process, medians over ``--rounds``:

1. **The loss's fixed cost.** On a tiny VAE (2x2 images, z_dim 2, one hidden layer of 4) every tensor operation
   costs only its dispatch, so the difference of the forward (and of the backward) between ``fit``'s loss (the
   VAE's trace-free twin plus the objective's formula, :class:`pyro_vae.training.ObjectiveModule`) and the
   hand-written loss of ``benchmarks/speed.py`` is the twin's fixed cost per step: its extra operations
   (separate log-density terms with their constants, the particle dimension, the decoder's image-shaped
   output) and its Python.
2. **The trainer's cost.** One ``guarded_step`` of ``fit`` whose loss is the hand-written one against the
   hand-written step, on the 784-400-20 VAE at ``--batch``: what ``fit``'s step adds besides the loss.

    python benchmarks/loss_overhead.py --objective elbo --batch 20
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
import speed  # noqa: E402


def fixed_cost(objective, rounds):
    """Median forward and backward microseconds of the hand-written and of fit's loss on a tiny VAE."""
    z_dim, speed.Z = speed.Z, 2  # the hand-written loss splits the encoder output at speed.Z
    try:
        x = torch.bernoulli(torch.rand(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 0.4)
        vae = pyro_vae.VAE(input_shape=(1, 2, 2), z_dim=2, hidden=(4,))
        hand, ours = speed.hand_loss(objective, {}), ObjectiveModule(vae, pyro_vae.make_objective(objective))
        losses = {"hand-written": lambda: hand(vae, x), "fit's loss": lambda: ours(x)}
        times = {name: ([], []) for name in losses}
        for _ in range(rounds):
            for name, loss_fn in losses.items():
                vae.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss = loss_fn()
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                times[name][0].append((t1 - t0) * 1e6)
                times[name][1].append((t2 - t1) * 1e6)
    finally:
        speed.Z = z_dim
    return {name: (statistics.median(f), statistics.median(b)) for name, (f, b) in times.items()}


def trainer_cost(objective, batch, rounds, steps=5):
    """Median ms per step: the hand-written step, and fit's step with the hand-written loss."""
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(batch, 1, 28, 28) * 0.4)
    vae = pyro_vae.VAE(input_shape=(1, 28, 28), z_dim=speed.Z, hidden=(speed.H,))
    loss = speed.hand_loss(objective, {})
    hand = speed.HandWritten(vae, loss, "fused", torch.device("cpu"))
    mine = copy.deepcopy(vae)
    module = ObjectiveModule(mine, pyro_vae.make_objective(objective))
    module._loss = lambda xb: loss(mine, xb)  # fit's step, the hand-written loss
    state = TrainState(mine, module.objective, make_adam(list(mine.parameters()), 1e-3, torch.device("cpu")),
                       module, torch.Generator(), torch.device("cpu"))

    def hand_step():
        value = hand.loss(hand.vae, x)
        hand.opt.zero_grad(set_to_none=True)
        (value / batch).backward()
        hand.opt.step()

    steps_of = {"hand-written step": hand_step, "fit's step, hand-written loss": lambda: guarded_step(state, (x,),
                                                                                                      "check")}
    times = {name: [] for name in steps_of}
    for _ in range(rounds):
        for name, step in steps_of.items():
            t = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t) / steps * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", default="elbo", choices=["elbo", "analytic"])
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2000)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"device: {speed.cpu_name()}, torch {torch.__version__}, {args.threads} thread(s)", flush=True)
    try:
        with pyro.validation_enabled(False):
            cost = fixed_cost(args.objective, args.rounds)
            trainer = trainer_cost(args.objective, args.batch, max(args.rounds // 10, 1))
    finally:
        torch.set_flush_denormal(False)  # (what fit leaves behind too)
    print(f"\n| tiny VAE, {args.objective} | forward us | backward us |\n|---|---|---|")
    for name, (f, b) in cost.items():
        print(f"| {name} | {f:.1f} | {b:.1f} |")
    print(f"\n| 784-400-20, batch {args.batch} | ms per step |\n|---|---|")
    for name, ms in trainer.items():
        print(f"| {name} | {ms:.3f} |")
    return cost, trainer


if __name__ == "__main__":
    main()
