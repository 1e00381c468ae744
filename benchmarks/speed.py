"""Training and evaluation speed: pyro-vae's ``fit`` against the same training written by hand in PyTorch.

**Training rows.** One epoch of :func:`pyro_vae.fit` against a hand-written epoch loop: the same 784-400-20
MLP VAE (Bernoulli likelihood), the same data with dynamic binarization (a fresh draw each epoch from a
generator, a random permutation, minibatches), the same estimator and **the same optimizer** (torch's fused
Adam, which ``fit`` uses). The hand-written loop accumulates the loss on the device and reads it once per
epoch, as ``fit`` does. They run interleaved in one process: ``fit`` trains ``--reps`` + 1 epochs and, after
each of its epochs, a callback times one hand-written epoch (of a separate copy of the model); the first epoch
of each is warm-up. Times are medians of the per-epoch wall times; ratios are medians of the per-epoch ratios
of the two epochs timed back to back (paired). Both run with denormals flushed to zero (``fit`` turns
that on while it trains, and the hand-written epochs run inside its callback; without it both slow down about
2x over the first epochs on MNIST). Second references: the hand-written loop with torch's
default (foreach) Adam, and ``fit(compile=True)`` (its first epoch, which compiles, excluded), which is
interleaved with the hand-written loop in the same way.

**Evaluation row.** Points per second of the K = 5000 importance-sampled log-likelihood
(:func:`pyro_vae.evaluation.log_likelihood`) against a hand-written batched estimator (chunks, streamed
logsumexp), with and without ``torch.compile`` of our particle twin.

**Scaling.** ms per optimizer step against batch size (K = 1) and against K (batch 128) for the hand-written
step, pyro-vae eager and pyro-vae compiled, as a PNG.

    python benchmarks/speed.py                          # training table, 1, 2 and 4 threads
    python benchmarks/speed.py --eval --eval-points 10000   # + evaluation on the whole MNIST test set
    python benchmarks/speed.py --scaling                # + the scaling figure
    python benchmarks/speed.py --rows none --threads 1 --eval --scaling   # only those two
    python benchmarks/speed.py --quick                  # a smoke run (what the tests execute)

Runs unchanged on a GPU when one is present (``--device auto``) and prints the device.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pyro

import pyro_vae
from pyro_vae.evaluation import log_likelihood
from pyro_vae.training import Callback, ObjectiveModule, TrainState, guarded_step, make_adam, resolve_device

Z, H = 20, 400
ROWS = [("ELBO", "elbo", {}, 20), ("ELBO", "elbo", {}, 128), ("analytic KL", "analytic", {}, 128),
        ("IWAE K=5", "iwae", {"num_particles": 5}, 20), ("IWAE K=50", "iwae", {"num_particles": 50}, 128)]


# ---------------------------------------------------------------------------------------------- hand-written
def _encode(vae, x):
    mu, raw = vae.encoder.net(x.flatten(1)).split(Z, -1)
    return mu, F.softplus(raw) + 1e-5


def _log_w(vae, x, mu, sigma, eps):
    """log p(x|z) + log p(z) - log q(z|x) for z = mu + sigma * eps, eps of shape (..., N, Z)."""
    z = mu + sigma * eps
    if z.dim() == 2:
        logits = vae.decoder.net(z)
    else:  # K particles: one 2-D matmul over K * N rows, as pyro-vae's decoder does
        logits = vae.decoder.net(z.reshape(-1, Z)).reshape(*z.shape[:-1], -1)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.flatten(1).expand_as(logits), reduction="none").sum(-1)
    return log_px - 0.5 * (z ** 2).sum(-1) + (0.5 * eps ** 2 + sigma.log()).sum(-1)  # the log 2 pi terms cancel


def hand_loss(objective, options):
    """The negative bound summed over the batch, written directly."""
    k = options.get("num_particles", 1)

    def elbo(vae, x):
        mu, sigma = _encode(vae, x)
        return -_log_w(vae, x, mu, sigma, torch.randn_like(mu)).sum()

    def analytic(vae, x):
        mu, sigma = _encode(vae, x)
        z = mu + sigma * torch.randn_like(mu)
        rec = -F.binary_cross_entropy_with_logits(vae.decoder.net(z), x.flatten(1), reduction="sum")
        return -(rec - 0.5 * (mu ** 2 + sigma ** 2 - 1 - 2 * sigma.log()).sum())

    def iwae(vae, x):
        mu, sigma = _encode(vae, x)
        log_w = _log_w(vae, x, mu, sigma, torch.randn(k, *mu.shape, device=mu.device))
        return -(torch.logsumexp(log_w, 0) - math.log(k)).sum()

    return {"elbo": elbo, "analytic": analytic, "iwae": iwae}[objective]


class HandWritten:
    """A hand-written training loop on its own copy of the VAE and its own optimizer."""

    def __init__(self, vae, loss, optimizer: str, device):
        self.vae, self.loss = copy.deepcopy(vae), loss
        params = list(self.vae.parameters())
        self.opt = make_adam(params, 1e-3, device) if optimizer == "fused" else torch.optim.Adam(params, lr=1e-3)
        self.generator = torch.Generator(device=device).manual_seed(1)

    def epoch(self, x, batch_size):
        xs = torch.bernoulli(x, generator=self.generator)
        total = torch.zeros((), device=x.device)
        for idx in torch.randperm(x.shape[0], generator=self.generator, device=x.device).split(batch_size):
            xb = xs[idx]
            loss = self.loss(self.vae, xb)
            self.opt.zero_grad(set_to_none=True)
            (loss / xb.shape[0]).backward()
            self.opt.step()
            total += loss.detach()
        return float(total) / x.shape[0]


class Interleave(Callback):
    """After each epoch of fit, time one epoch of each hand-written loop."""

    def __init__(self, loops: dict, x, batch_size):
        self.loops, self.x, self.batch_size = loops, x, batch_size
        self.seconds = {name: [] for name in loops}

    def on_epoch_end(self, state, metrics):
        for name, loop in self.loops.items():
            t = time.perf_counter()
            loop.epoch(self.x, self.batch_size)
            self.seconds[name].append(time.perf_counter() - t)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- training rows
def bench_row(name, objective, options, batch, x, reps, device, compile_row=True):
    torch.manual_seed(0)
    vae = pyro_vae.VAE(input_shape=(1, 28, 28), z_dim=Z, hidden=(H,)).to(device)
    loss = hand_loss(objective, options)
    loops = {"hand": HandWritten(vae, loss, "fused", device), "hand_foreach": HandWritten(vae, loss, "foreach", device)}
    interleave = Interleave(loops, x, batch)
    with pyro.validation_enabled(False):
        history = pyro_vae.fit(vae, x, objective=objective, epochs=reps + 1, batch_size=batch, progress=False,
                               device=device, callbacks=[interleave], **options)
        fit_s, hand_s = [m["seconds"] for m in history[1:]], interleave.seconds["hand"][1:]
        row = {"row": name, "batch": batch, "fit_s": statistics.median(fit_s),
               **{f"{k}_s": statistics.median(v[1:]) for k, v in interleave.seconds.items()},
               "fit_over_hand": paired_ratio(fit_s, hand_s)}
        if compile_row:
            torch._dynamo.reset()  # a fresh compile cache per row: rows never share (or exhaust) recompilations
            beside = Interleave({"hand": loops["hand"]}, x, batch)  # the same hand-written loop, interleaved again
            compiled = pyro_vae.fit(copy.deepcopy(vae), x, objective=objective, epochs=reps + 1, batch_size=batch,
                                    progress=False, device=device, compile=True, callbacks=[beside], **options)
            compiled_s = [m["seconds"] for m in compiled[1:]]
            row["compiled_s"] = statistics.median(compiled_s)
            row["compile_seconds"] = compiled[0].get("compile_seconds", 0.0)
            row["hand_over_compiled"] = paired_ratio(beside.seconds["hand"][1:], compiled_s)
    return row


def paired_ratio(numerators, denominators) -> float:
    """The median over epochs of numerator / denominator, each pair timed back to back (robust to the machine's
    slow drifts, which a ratio of two medians is not)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


# ---------------------------------------------------------------------------------------------- evaluation
def hand_log_likelihood(vae, x, k, chunk):
    """Batched importance sampling: logsumexp over K samples in chunks, streamed."""
    mu, sigma = _encode(vae, x)
    acc = torch.full((x.shape[0],), -math.inf, device=x.device)
    for start in range(0, k, chunk):
        eps = torch.randn(min(chunk, k - start), *mu.shape, device=x.device)
        acc = torch.logaddexp(acc, torch.logsumexp(_log_w(vae, x, mu, sigma, eps), 0))
    return acc - math.log(k)


def bench_eval(x, k, device, batch=20, chunk=500, compile=True):
    torch.manual_seed(0)
    vae = pyro_vae.VAE(input_shape=(1, 28, 28), z_dim=Z, hidden=(H,)).to(device).eval()
    results = {}
    with torch.no_grad(), pyro.validation_enabled(False):
        for name, fn in [("hand", lambda xb: hand_log_likelihood(vae, xb, k, chunk)),
                         ("ours", lambda xb: log_likelihood(vae.model, vae.guide, xb, num_samples=k, progress=False))]:
            fn(x[:batch])  # warm-up
            _sync(device)
            t = time.perf_counter()
            for xb in x.split(batch):
                fn(xb)
            _sync(device)
            results[f"{name}_points_per_s"] = x.shape[0] / (time.perf_counter() - t)
        if compile:
            results["compiled_points_per_s"] = _compiled_eval(vae, x, k, batch, chunk, device)
    return {"row": f"log-likelihood K={k}", "points": int(x.shape[0]), **results,
            "ours_over_hand_throughput": results["ours_points_per_s"] / results["hand_points_per_s"]}


def _compiled_eval(vae, x, k, batch, chunk, device):
    """pyro-vae's log-likelihood with the twin's log weights under torch.compile (compile time excluded)."""
    fn = lambda xb: log_likelihood(vae.model, vae.guide, xb, num_samples=k, chunk_size=chunk,  # noqa: E731
                                   progress=False, compile=True)
    fn(x[:batch])
    _sync(device)
    t = time.perf_counter()
    for xb in x.split(batch):
        if xb.shape[0] == batch:
            fn(xb)
    _sync(device)
    return (x.shape[0] // batch * batch) / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------- scaling
def step_ms(step, steps, device):
    step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t) / steps * 1e3


def bench_scaling(batches, ks, steps, device):
    """ms per step: batch sweep at K = 1 (ELBO), K sweep at batch 128 (IWAE)."""
    rows = []
    for batch, k in [(b, 1) for b in batches] + [(128, k) for k in ks if k > 1]:
        torch.manual_seed(0)
        x = torch.bernoulli(torch.rand(batch, 1, 28, 28, device=device) * 0.4)
        vae = pyro_vae.VAE(input_shape=(1, 28, 28), z_dim=Z, hidden=(H,)).to(device)
        objective, options = ("elbo", {}) if k == 1 else ("iwae", {"num_particles": k})
        hand = HandWritten(vae, hand_loss(objective, options), "fused", device)

        def hand_step():
            loss = hand.loss(hand.vae, x)
            hand.opt.zero_grad(set_to_none=True)
            (loss / batch).backward()
            hand.opt.step()

        row = {"batch": batch, "k": k, "hand_ms": step_ms(hand_step, steps, device)}
        for name, compile in (("eager_ms", False), ("compiled_ms", True)):
            torch._dynamo.reset()  # each shape compiled afresh (static shapes, no recompilation limit)
            module = ObjectiveModule(vae, pyro_vae.make_objective(objective, **options), compile=compile)
            state = TrainState(vae, module.objective, make_adam(list(vae.parameters()), 1e-3, device), module,
                               torch.Generator(device=device), device)
            with pyro.validation_enabled(False):
                module(x)  # compiles
                row[name] = step_ms(lambda: guarded_step(state, (x,), "none"), steps, device)
        rows.append(row)
        print(row, flush=True)
    return rows


def plot_scaling(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, sel, label in ((axes[0], "batch", [r for r in rows if r["k"] == 1], "batch size (K = 1)"),
                                (axes[1], "k", [r for r in rows if r["batch"] == 128], "K (batch 128)")):
        sel = sorted(sel, key=lambda r: r[key])
        for name, style in (("hand_ms", "k-o"), ("eager_ms", "b-s"), ("compiled_ms", "r-^")):
            ax.plot([r[key] for r in sel], [r[name] for r in sel], style, label=name.replace("_ms", ""))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("ms per step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("784-400-20 VAE, one training step (fused Adam)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def training_data(n, data_dir, device):
    """The first n MNIST training digits (grayscale in [0, 1]) when the files are there, else random images."""
    try:
        x = pyro_vae.load_dataset("mnist", data_dir).x_train[:n]
    except pyro_vae.DataError:
        x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.4
    return x.to(device)


def markdown(rows, evals):
    out = ["| row | batch | threads | hand-written (fused Adam) s | fit s | fit / hand (paired) | "
           "hand, foreach Adam s | fit --compile s | hand / compiled (paired) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['row']} | {r['batch']} | {r['threads']} | {r['hand_s']:.3f} | {r['fit_s']:.3f} | "
                   f"{r['fit_over_hand']:.3f}x | {r['hand_foreach_s']:.3f} | {r.get('compiled_s', float('nan')):.3f} | "
                   f"{r.get('hand_over_compiled', float('nan')):.2f}x |")
    for e in evals:
        out += ["", "| evaluation | points | hand-written points/s | pyro-vae points/s | pyro-vae compiled points/s |",
                "|---|---|---|---|---|", f"| {e['row']} | {e['points']} | {e['hand_points_per_s']:.1f} | "
                f"{e['ours_points_per_s']:.1f} | {e.get('compiled_points_per_s', float('nan')):.1f} |"]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2,4")
    p.add_argument("--points", type=int, default=12800, help="training points per epoch")
    p.add_argument("--reps", type=int, default=5, help="timed epochs per implementation")
    p.add_argument("--rows", default=None, help="comma-separated row indices (default all; 'none' for no training rows)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--eval", action="store_true")
    p.add_argument("--eval-points", type=int, default=10000)
    p.add_argument("--eval-samples", type=int, default=5000)
    p.add_argument("--scaling", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results/speed.json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.threads, args.points, args.reps, args.no_compile, args.eval_points, args.eval_samples = \
            "1", 256, 1, True, 4, 100
        args.rows = args.rows or "0"
    device = resolve_device(args.device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()}"
          f" ({device}), torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    x = training_data(args.points, args.data_dir, device)
    picked = ([] if args.rows == "none" else [ROWS[int(i)] for i in args.rows.split(",")]) if args.rows else ROWS
    rows, evals, scaling = [], [], []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, objective, options, batch in picked:
            rows.append({"threads": threads, **bench_row(name, objective, options, batch, x, args.reps, device,
                                                         not args.no_compile)})
            print(rows[-1], flush=True)
    if args.eval or args.quick:
        xt = pyro_vae.data.prepare_eval_data(pyro_vae.VAE((1, 28, 28)), _test_digits(args, device))
        evals.append(bench_eval(xt, args.eval_samples, device, compile=not args.no_compile))
    if args.scaling:
        scaling = bench_scaling([20, 64, 128, 256, 512, 1024], [1, 5, 10, 20, 50], 30, device)
        plot_scaling(scaling, Path(args.out).with_suffix(".png"))
    meta = {"date": time.strftime("%Y-%m-%d"), "device": str(device), "machine": platform.machine(), "cpu": cpu_name(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "pyro": pyro.__version__, "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "eval": evals, "scaling": scaling}, indent=2))
    print(markdown(rows, evals))
    return rows, evals


def _test_digits(args, device):
    try:
        return pyro_vae.load_dataset("mnist", args.data_dir).x_test[: args.eval_points].to(device)
    except pyro_vae.DataError:
        return (torch.rand(args.eval_points, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 0.4).to(device)


if __name__ == "__main__":
    main()
