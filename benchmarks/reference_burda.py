"""A plain-PyTorch reference for Burda et al. (2015), one stochastic layer, to compare pyro-vae against.

No Pyro anywhere in the model, the objective, the training loop or the evaluation: a 784-200-200-50 tanh MLP
encoder (mu and a raw scale per latent), a mirrored 50-200-200-784 tanh decoder emitting Bernoulli logits, the
ELBO (``--k 1``) or the IWAE bound with k particles (``--k 5``), dynamic binarization each epoch, minibatches
of 100, Adam at a constant learning rate, and a hand-written importance-sampled test NLL,

    log p(x) ~ logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K,   z_k ~ q(z|x),

with K = 5000 particles drawn in chunks and combined by a streaming logsumexp, reported with its standard
error over test points. Only the data loader comes from pyro-vae (``pyro_vae.data.load_dataset``, and the same
fixed-seed binarization of the test set as ``pyro_vae.data.prepare_eval_data``), so the data are identical.

Every default that could explain a gap to pyro-vae is a flag; the "pyro-vae-like" setting is
``--output-bias zero --adam-eps 1e-8 --scale-param softplus --kl mc`` (the defaults of this script), a typical
reference script's is ``--output-bias data-mean --adam-eps 1e-4 --scale-param exp --kl analytic``.

* ``--output-bias zero|data-mean``: the decoder's last bias at PyTorch's default init, or at the logit of the
  mean training pixel (clamped to [1e-3, 1 - 1e-3]); the weights are drawn identically either way.
* ``--adam-eps``: Adam's epsilon (pyro-vae: 1e-8; Burda et al.: 1e-4).
* ``--scale-param softplus|exp``: sigma = softplus(raw) + 1e-5 (pyro-vae) or sigma = exp(raw) (raw = log sigma).
* ``--kl mc|analytic``: the VAE's KL term by Monte Carlo (log q(z|x) - log p(z) at the sample, what Pyro's
  Trace_ELBO and ``pyro-vae --objective elbo`` do) or in closed form. IWAE (k > 1) has no separate KL term.

Random streams mirror pyro-vae's ``fit``: the weights are drawn after ``torch.manual_seed(seed)`` (encoder, then
decoder), the data order and binarization come from ``torch.Generator().manual_seed(seed)`` (binarize, then
permute, every epoch), the noise from the global generator reseeded with ``seed`` before training. The test NLL
uses its own noise seed, so two models are compared on the same test digits and the same eps draws.

Usage::

    # pyro-vae-like defaults, VAE, 150 epochs, K = 5000 on the first 2000 test digits
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/reference_burda.py --data-dir /work/shared/data \\
        --epochs 150 --test-points 2000 --num-samples 5000 --name vae_pyrolike
    # a typical reference script's choices
    python benchmarks/reference_burda.py --data-dir /work/shared/data --output-bias data-mean --adam-eps 1e-4 \\
        --scale-param exp --kl analytic --name vae_best
    # IWAE with 5 particles
    python benchmarks/reference_burda.py --data-dir /work/shared/data --k 5 --name iwae5
    # a few-second smoke run on the bundled 8x8 digits (what the tests run)
    python benchmarks/reference_burda.py --quick

Writes ``benchmarks/results/reference_burda_<name>.json`` (settings, test NLL and its s.e., test ELBO, the
per-point NLLs for paired comparisons, train time, per-epoch train loss); ``--out`` chooses another path.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pyro_vae.data import TEST_BINARIZATION_SEED, load_dataset

RESULTS = Path(__file__).resolve().parent / "results"
LOG_2PI = math.log(2 * math.pi)
MIN_SCALE = 1e-5  # pyro-vae's floor under softplus scales
EVAL_NOISE_SEED = 12345


# ---------------------------------------------------------------------------------------------- the model
def mlp(sizes) -> nn.Sequential:
    """Linear -> tanh -> ... -> Linear (no activation after the last layer); PyTorch's default init."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class ReferenceVAE(nn.Module):
    """q(z|x) = N(mu(x), diag sigma(x)^2), p(z) = N(0, I), p(x|z) = prod_i Bernoulli(x_i; sigmoid(logit_i(z)))."""

    def __init__(self, x_dim: int = 784, hidden=(200, 200), z_dim: int = 50, scale_param: str = "softplus"):
        super().__init__()
        self.z_dim, self.scale_param = z_dim, scale_param
        # the same modules in the same order as pyro_vae's MLPEncoder / MLPDecoder, so one seed gives the same
        # initial weights (and a state dict maps one-to-one: encoder.* / decoder.* <-> encoder.net.* / decoder.net.*)
        self.encoder = mlp([x_dim, *hidden, 2 * z_dim])
        self.decoder = mlp([z_dim, *reversed(tuple(hidden)), x_dim])

    def encode(self, x):
        mu, raw = self.encoder(x).split(self.z_dim, dim=-1)
        sigma = torch.exp(raw) if self.scale_param == "exp" else F.softplus(raw) + MIN_SCALE
        return mu, sigma

    def log_weights(self, x, k: int, kl: str = "mc"):
        """(log p(x|z), log p(z) - log q(z|x) or -KL) per particle and point, shapes (k, N), with z ~ q(z|x)."""
        mu, sigma = self.encode(x)
        eps = torch.randn(k, *mu.shape, dtype=mu.dtype, device=mu.device)
        z = mu + sigma * eps
        logits = self.decoder(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        if kl == "analytic":
            neg_kl = 0.5 * (1 + 2 * sigma.log() - mu.pow(2) - sigma.pow(2)).sum(-1)
            return log_px, neg_kl.expand_as(log_px)
        log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
        log_qz = (-0.5 * eps.pow(2) - sigma.log() - 0.5 * LOG_2PI).sum(-1)  # log N(z; mu, sigma) at z = mu + sigma eps
        return log_px, log_pz - log_qz


def loss_fn(model: ReferenceVAE, x, k: int, kl: str):
    """Minus the objective, summed over the batch: -ELBO (k = 1) or -IWAE_k."""
    log_px, rest = model.log_weights(x, k, kl if k == 1 else "mc")
    log_w = log_px + rest
    if k == 1:
        return -log_w[0].sum()
    return -(torch.logsumexp(log_w, 0) - math.log(k)).sum()


def output_bias_logits(x_train: torch.Tensor, clamp: float = 1e-3) -> torch.Tensor:
    """logit(mean training pixel), the mean clamped to [clamp, 1 - clamp]; x_train of shape (N, D)."""
    p = x_train.mean(0).clamp(clamp, 1 - clamp)
    return torch.log(p) - torch.log1p(-p)


def init_output_bias(model: ReferenceVAE, x_train: torch.Tensor, clamp: float = 1e-3) -> None:
    """The decoder's last bias at logit(mean training pixel), clamped to [clamp, 1 - clamp]."""
    with torch.no_grad():
        model.decoder[-1].bias.copy_(output_bias_logits(x_train, clamp))


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def test_log_likelihood(model: ReferenceVAE, x, num_samples: int = 5000, batch: int = 20, chunk: int = 500,
                        seed: int = EVAL_NOISE_SEED):
    """Per-point importance-sampled log p(x) and the per-point ELBO (the mean of the same log-weights).

    ``batch`` points by ``chunk`` particles per pass (10 000 cells stay in cache on the CPU); the chunks of one
    batch are combined by a streaming logsumexp, acc <- logaddexp(acc, logsumexp(chunk))."""
    torch.manual_seed(seed)
    model.eval()
    lls, elbos = [], []
    for xb in x.split(batch):
        acc, total = None, torch.zeros(xb.shape[0], dtype=x.dtype)
        for start in range(0, num_samples, chunk):
            log_px, rest = model.log_weights(xb, min(chunk, num_samples - start), "mc")
            log_w = log_px + rest
            part = torch.logsumexp(log_w, 0)
            acc = part if acc is None else torch.logaddexp(acc, part)
            total += log_w.sum(0)
        lls.append(acc - math.log(num_samples))
        elbos.append(total / num_samples)
    model.train()
    return torch.cat(lls), torch.cat(elbos)


@torch.no_grad()
def latent_statistics(model: ReferenceVAE, x, threshold: float = 0.01) -> dict:
    """Active units (Burda et al.: Cov_x(E_q[z_u|x]) > 0.01) and the mean closed-form KL(q(z|x) || p(z))."""
    mu, sigma = model.encode(x)
    kl = 0.5 * (sigma.pow(2) + mu.pow(2) - 1 - 2 * sigma.log())
    return {"active_units": int((mu.var(0) > threshold).sum()), "test_kl": float(kl.sum(-1).mean()),
            "kl_per_dimension": [round(v, 4) for v in kl.mean(0).tolist()]}


# ---------------------------------------------------------------------------------------------- training
def binarized_test_set(x_test: torch.Tensor, n: int | None) -> torch.Tensor:
    """The test set binarized once with pyro-vae's fixed seed (as ``prepare_eval_data``), first ``n`` points."""
    xb = torch.bernoulli(x_test, generator=torch.Generator().manual_seed(TEST_BINARIZATION_SEED))
    return xb[:n].reshape(xb[:n].shape[0], -1)


def train_epoch(model, optimizer, x_train, generator, batch_size: int, loss_fn) -> float:
    """One epoch: binarize every pixel afresh, then minibatches in a random order (both from ``generator``), one
    Adam step on the mean of ``loss_fn(model, x_batch)`` (a sum over the batch) each; the loss per training point."""
    xs = torch.bernoulli(x_train, generator=generator)
    total = torch.zeros(())
    for idx in torch.randperm(xs.shape[0], generator=generator).split(batch_size):
        loss = loss_fn(model, xs[idx])
        optimizer.zero_grad(set_to_none=True)
        (loss / idx.shape[0]).backward()
        optimizer.step()
        total += loss.detach()
    return float(total) / xs.shape[0]


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.data_dir, args.val_fraction, args.seed)
    x_train = data.x_train.reshape(data.x_train.shape[0], -1).contiguous()
    x_test = binarized_test_set(data.x_test, args.test_points)

    torch.manual_seed(args.seed)  # the weights (pyro.set_rng_seed(seed) before building the VAE in pyro-vae)
    model = ReferenceVAE(x_train.shape[1], tuple(args.hidden), args.z_dim, args.scale_param)
    if args.output_bias == "data-mean":
        init_output_bias(model, x_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, eps=args.adam_eps, fused=True)
    generator = torch.Generator().manual_seed(args.seed)  # data order and binarization
    torch.manual_seed(args.seed)  # the noise

    history, t_train = [], 0.0
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        loss = train_epoch(model, optimizer, x_train, generator, args.batch_size,
                           lambda m, xb: loss_fn(m, xb, args.k, args.kl))
        seconds = time.perf_counter() - t0
        t_train += seconds
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch}")
        history.append({"epoch": epoch, "train_loss": loss, "seconds": seconds})
        if args.verbose:
            print(f"epoch {epoch:4d}  loss {loss:8.3f}  {seconds:6.1f} s", flush=True)

    t0 = time.perf_counter()
    ll, elbo = test_log_likelihood(model, x_test, args.num_samples)
    t_eval = time.perf_counter() - t0
    nll = -ll
    n = nll.shape[0]
    if args.save_model:
        RESULTS.joinpath("models").mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), RESULTS / "models" / f"{args.name}.pt")
    return {**latent_statistics(model, x_test),
        "name": args.name, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "verbose")},
        "num_train": int(x_train.shape[0]), "num_test": int(n), "num_samples": int(args.num_samples),
        "test_nll": float(nll.mean()), "test_nll_stderr": float(nll.std() / math.sqrt(n)) if n > 1 else None,
        "test_elbo": float(elbo.mean()), "test_elbo_stderr": float(elbo.std() / math.sqrt(n)) if n > 1 else None,
        "train_seconds": t_train, "seconds_per_epoch": t_train / max(1, args.epochs), "eval_seconds": t_eval,
        "history": history, "per_point_nll": [round(v, 4) for v in nll.tolist()],
        "per_point_elbo": [round(v, 4) for v in elbo.tolist()],
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
    }


def protocol_parser(doc: str) -> argparse.ArgumentParser:
    """The options of Burda et al.'s protocol that every plain reference shares (data, epochs, batch, Adam's lr, k)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out of training (pyro-vae's default 0.1)")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k", type=int, default=1, help="particles: 1 = VAE (ELBO), k > 1 = IWAE_k")
    return p


def parse_args(argv=None):
    p = protocol_parser(__doc__)
    p.add_argument("--z-dim", type=int, default=50)
    p.add_argument("--hidden", type=lambda s: [int(h) for h in s.split(",")], default=[200, 200])
    p.add_argument("--output-bias", choices=["zero", "data-mean"], default="zero",
                   help="zero: PyTorch's default init of the decoder's last bias (pyro-vae); data-mean: logit of "
                        "the mean training pixel")
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--scale-param", choices=["softplus", "exp"], default="softplus")
    p.add_argument("--kl", choices=["mc", "analytic"], default="mc", help="VAE's KL term (ignored for k > 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-points", type=int, default=2000)
    p.add_argument("--num-samples", type=int, default=5000, help="K of the test NLL")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None, help="result name (default from the settings)")
    p.add_argument("--out", default=None,
                   help="result JSON path (default benchmarks/results/reference_burda_<name>.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: digits, 1 epoch, K=20, 50 test points")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--save-model", action="store_true", help="also save the weights to results/models/<name>.pt")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.epochs, args.num_samples, args.test_points = "digits", 1, 20, 50
    if args.name is None:
        obj = "vae" if args.k == 1 else f"iwae{args.k}"
        args.name = (f"{obj}_{args.dataset}_e{args.epochs}_bias-{args.output_bias}_eps{args.adam_eps:g}"
                     f"_{args.scale_param}_kl-{args.kl}_val{args.val_fraction:g}_s{args.seed}")
    return args


def write_result(result: dict, args, summary: str) -> Path:
    """Write ``result`` to ``--out`` (default results/reference_burda_<name>.json) and print ``summary -> path``."""
    out = Path(args.out) if args.out else RESULTS / f"reference_burda_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.name}: {summary} -> {out}")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = train(args)
    write_result(result, args, f"test NLL {result['test_nll']:.3f} +- {result['test_nll_stderr'] or 0:.3f} "
                               f"(K={args.num_samples}, {result['num_test']} points), "
                               f"test ELBO {result['test_elbo']:.3f}, {result['active_units']} active units, "
                               f"{result['seconds_per_epoch']:.1f} s/epoch, eval {result['eval_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
