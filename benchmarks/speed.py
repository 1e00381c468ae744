"""Training-step and evaluation speed: pyro-vae vs the same maths hand-written in PyTorch vs Pyro's stock SVI.

Every row times three implementations of one training step on the same network (784-400-20 MLP VAE, Bernoulli
likelihood), the same batch and the same number of samples, interleaved in one process: several repetitions of
`--steps` steps each, the median per-step time of each, and the ratios.

* ours: the step `pyro-vae train` runs (`pyro_vae.training.train_step`: the objective's loss through
  `_ObjectiveLoss`, one fused torch Adam from `make_adam`);
* hand: the same estimator written directly in PyTorch, with torch's default Adam (`torch.optim.Adam(params)`,
  the foreach implementation on CPU);
* pyro: Pyro's stock `SVI.step` with `pyro.optim.Adam` and Trace_ELBO / TraceMeanField_ELBO / RenyiELBO(alpha=0).

The evaluation row compares importance-sampled log-likelihood throughput (K=5000, data points per second) of
`pyro_vae.evaluation.log_likelihood` with a hand-written batched PyTorch estimator.

    python benchmarks/speed.py                       # the full table (a few minutes on 2 cores)
    python benchmarks/speed.py --quick               # a smoke run (what the tests execute)
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pyro
from pyro.infer import SVI, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import VAE
from pyro_vae.objectives import make_objective
from pyro_vae.objectives import ParticleObjective
from pyro_vae.training import ObjectiveModule, TrainState, guarded_step, make_adam

Z, H = 20, 400


# ----------------------------------------------------------------- hand-written references
def _encode(vae, x):
    h = vae.encoder.net(x.flatten(1))
    mu, raw = h.split(Z, -1)
    return mu, F.softplus(raw) + 1e-5


def _log_w(vae, x, mu, sigma, eps):
    """log p(x|z) + log p(z) - log q(z|x) for z = mu + sigma * eps, eps of shape (..., N, Z)."""
    z = mu + sigma * eps
    logits = vae.decoder.net(z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.flatten(1).expand_as(logits), reduction="none").sum(-1)
    log_pz = -0.5 * (z ** 2).sum(-1)
    log_q = (-0.5 * eps ** 2 - sigma.log()).sum(-1)
    return log_px + log_pz - log_q  # the 0.5 log 2 pi terms cancel


def hand_elbo(vae, x):
    mu, sigma = _encode(vae, x)
    return -_log_w(vae, x, mu, sigma, torch.randn_like(mu)).sum()


def hand_analytic(vae, x):
    mu, sigma = _encode(vae, x)
    z = mu + sigma * torch.randn_like(mu)
    logits = vae.decoder.net(z)
    rec = -F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="sum")
    kl = 0.5 * (mu ** 2 + sigma ** 2 - 1 - 2 * sigma.log()).sum()
    return -(rec - kl)


def hand_iwae(k):
    def loss(vae, x):
        mu, sigma = _encode(vae, x)
        log_w = _log_w(vae, x, mu, sigma, torch.randn(k, *mu.shape))
        return -(torch.logsumexp(log_w, 0) - math.log(k)).sum()

    return loss


ROWS = [  # name, our objective, hand-written loss, Pyro's stock objective
    ("ELBO (Trace_ELBO)", lambda: make_objective("elbo"), hand_elbo, lambda: Trace_ELBO()),
    ("analytic KL", lambda: make_objective("analytic"), hand_analytic, lambda: TraceMeanField_ELBO()),
    ("IWAE K=5", lambda: make_objective("iwae", num_particles=5), hand_iwae(5),
     lambda: RenyiELBO(alpha=0, num_particles=5)),
    ("IWAE K=50", lambda: make_objective("iwae", num_particles=50), hand_iwae(50),
     lambda: RenyiELBO(alpha=0, num_particles=50)),
]


def _median_step_ms(step, steps):
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps * 1e3


def bench_row(name, ours_obj, hand_loss, stock_obj, batch, steps, reps):
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(batch, 1, 28, 28) * 0.4)
    vae = VAE(input_shape=(1, 28, 28), z_dim=Z, hidden=(H,))
    params = list(vae.parameters())
    opt = make_adam(params, 1e-4, torch.device("cpu"))  # what `pyro-vae train` uses (fused Adam)
    hand_opt = torch.optim.Adam(params, lr=1e-4)  # what a hand-written script writes: torch's default Adam
    loss_fn = ObjectiveModule(vae, ours_obj())
    state = TrainState(vae, loss_fn.objective, opt, loss_fn, torch.Generator(), torch.device("cpu"))
    pyro.clear_param_store()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-4}), stock_obj())

    def ours():
        guarded_step(state, (x,), "check")

    def hand():
        loss = hand_loss(vae, x)
        hand_opt.zero_grad(set_to_none=True)
        (loss / batch).backward()
        hand_opt.step()

    def stock():
        svi.step(x)

    times = {"ours": [], "hand": [], "pyro": []}
    with pyro.validation_enabled(False):
        for f in (ours, hand, stock):  # warm up
            _median_step_ms(f, max(3, steps // 5))
        for _ in range(reps):
            for key, f in (("hand", hand), ("ours", ours), ("pyro", stock)):
                times[key].append(_median_step_ms(f, steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"row": name, "batch": batch, "direct_path": isinstance(loss_fn.objective, ParticleObjective),
            "hand_ms": med["hand"], "ours_ms": med["ours"], "pyro_ms": med["pyro"],
            "ours_over_hand": med["ours"] / med["hand"], "pyro_over_hand": med["pyro"] / med["hand"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def hand_log_likelihood(vae, x, k, chunk):
    """Batched importance sampling: logsumexp over K samples, in chunks, streamed."""
    mu, sigma = _encode(vae, x)
    acc = torch.full((x.shape[0],), -math.inf)
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        acc = torch.logaddexp(acc, torch.logsumexp(_log_w(vae, x, mu, sigma, torch.randn(n, *mu.shape)), 0))
    return acc - math.log(k) - 0.5 * 0  # (normalizing constants cancel between p(z) and q)


def bench_eval(points, k, reps):
    from pyro_vae.evaluation import log_likelihood

    torch.manual_seed(0)
    vae = VAE(input_shape=(1, 28, 28), z_dim=Z, hidden=(H,)).eval()
    x = torch.bernoulli(torch.rand(points, 1, 28, 28) * 0.4)
    t_ours, t_hand = [], []
    with torch.no_grad(), pyro.validation_enabled(False):
        for _ in range(reps):
            t = time.perf_counter()
            log_likelihood(vae.model, vae.guide, x, num_samples=k, progress=False)
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            hand_log_likelihood(vae, x, k, chunk=500)
            t_hand.append(time.perf_counter() - t)
    ours, hand = points / statistics.median(t_ours), points / statistics.median(t_hand)
    return {"row": f"log-likelihood K={k}", "points": points, "ours_points_per_s": ours,
            "hand_points_per_s": hand, "ours_over_hand_throughput": ours / hand,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def markdown(rows, evals):
    out = ["| row | batch | hand-written ms | pyro-vae ms | Pyro stock ms | pyro-vae / hand | Pyro / hand |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['row']} | {r['batch']} | {r['hand_ms']:.2f} | {r['ours_ms']:.2f} | {r['pyro_ms']:.2f} | "
                   f"{r['ours_over_hand']:.2f}x | {r['pyro_over_hand']:.2f}x |")
    for e in evals:
        out += ["", "| evaluation | points | hand-written points/s | pyro-vae points/s | pyro-vae / hand |",
                "|---|---|---|---|---|",
                f"| {e['row']} | {e['points']} | {e['hand_points_per_s']:.1f} | {e['ours_points_per_s']:.1f} | "
                f"{e['ours_over_hand_throughput']:.2f}x |"]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="20,128")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--eval-points", type=int, default=20)
    p.add_argument("--eval-samples", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/speed.json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.reps, args.eval_points, args.eval_samples, args.batches = 3, 1, 2, 100, "8"
    torch.set_num_threads(args.threads)
    rows = [bench_row(name, o, h, s, int(b), args.steps, args.reps)
            for b in args.batches.split(",") for name, o, h, s in ROWS]
    evals = [bench_eval(args.eval_points, args.eval_samples, max(1, args.reps // 2))]
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {args.threads} threads",
            "torch": torch.__version__, "pyro": pyro.__version__, "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "eval": evals}, indent=2))
    print(markdown(rows, evals))
    return rows, evals


if __name__ == "__main__":
    main()
