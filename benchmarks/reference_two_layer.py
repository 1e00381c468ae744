"""A plain-PyTorch reference for Burda et al.'s two-stochastic-layer VAE/IWAE, to compare pyro-vae against.

No Pyro in the model, the objective, the training loop or the evaluation. The architecture is Burda, Grosse &
Salakhutdinov ("Importance Weighted Autoencoders", ICLR 2016, section 5), tanh everywhere:

    q(z_1 | x)   = N(mu, diag sigma^2) from x -200-200- (mu, sigma),   z_1 in R^100
    q(z_2 | z_1) = N(mu, diag sigma^2) from z_1 -100-100- (mu, sigma), z_2 in R^50       (bottom-up)
    p(z_2) = N(0, I),   p(z_1 | z_2) = N(mu, diag sigma^2) from z_2 -100-100- (mu, sigma),
    p(x | z_1) = prod_i Bernoulli(x_i; sigmoid(logit_i)) from z_1 -200-200- logits,

with sigma = softplus(raw) + 1e-5 (pyro-vae's parametrization). The log weight of one particle is

    log w = log p(x | z_1) + log p(z_1 | z_2) + log p(z_2) - log q(z_1 | x) - log q(z_2 | z_1),

the objective the ELBO (``--k 1``; ``--kl analytic`` takes KL(q(z_2|z_1) || N(0, I)) in closed form, as
pyro-vae's ``analytic`` objective does for the top layer, and log q - log p for z_1) or IWAE_k =
logsumexp_k log w_k - log k. Dynamic binarization every epoch, minibatches of 100, Adam at a constant rate. The
test NLL is importance sampling with K = 5000 particles (chunks combined by a streaming logsumexp), on the test
set binarized once with pyro-vae's fixed seed; reported on the first 2000 test digits and on all of them, each
with its standard error. Per layer: the mean KL(q || p) term and the active units (Cov_x E_q[z_l | x] > 0.01).

The modules are created in the order of :class:`pyro_vae.HierarchicalVAE` (encoder trunk and head of layer 1,
of layer 2, then the decoder's networks), so one seed gives both the same initial weights.

Training resumes: a checkpoint (weights, Adam, random streams, history) is written after every epoch, and
running the same command with a larger ``--epochs`` continues from it, bit for bit as an uninterrupted run.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/reference_two_layer.py --data-dir ../shared/data --epochs 150 --k 1
    OMP_NUM_THREADS=1 python benchmarks/reference_two_layer.py --data-dir ../shared/data --epochs 150 --k 5
    python benchmarks/reference_two_layer.py --quick        # seconds, on the bundled 8x8 digits (the tests)

Writes ``benchmarks/results/reference_two_layer_<name>.json`` (settings, test NLLs with their s.e., per-point
NLLs for paired comparisons, per-layer KL and active units, seconds per epoch, per-epoch train loss).
"""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pyro_vae.data import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_burda import binarized_test_set, protocol_parser, train_epoch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOG_2PI = math.log(2 * math.pi)
MIN_SCALE = 1e-5
EVAL_NOISE_SEED = 12345
ACTIVE_THRESHOLD = 0.01


def mlp(sizes, final_activation: bool = False) -> nn.Sequential:
    """Linear -> tanh -> ... -> Linear (tanh after the last layer too with ``final_activation``)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if final_activation or i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def normal_log_prob(value, loc, scale):
    """log N(value; loc, diag scale^2), summed over the last dimension."""
    return (-0.5 * ((value - loc) / scale).pow(2) - scale.log() - 0.5 * LOG_2PI).sum(-1)


class TwoLayerVAE(nn.Module):
    """Burda et al.'s two-stochastic-layer model with a bottom-up guide (see the module docstring)."""

    def __init__(self, x_dim: int = 784, z_dims=(100, 50)):
        super().__init__()
        z1, z2 = z_dims
        self.z_dims = (z1, z2)
        self.trunk1, self.head1 = mlp([x_dim, 2 * z1, 2 * z1], True), nn.Linear(2 * z1, 2 * z1)
        self.trunk2, self.head2 = mlp([z1, 2 * z2, 2 * z2], True), nn.Linear(2 * z2, 2 * z2)
        self.decoder_x = mlp([z1, 2 * z1, 2 * z1, x_dim])       # z_1 -> logits of p(x | z_1)
        self.decoder_z1 = mlp([z2, 2 * z2, 2 * z2, 2 * z1])     # z_2 -> (mu, raw sigma) of p(z_1 | z_2)

    @staticmethod
    def gaussian(params):
        loc, raw = params.chunk(2, dim=-1)
        return loc, F.softplus(raw) + MIN_SCALE

    def q1(self, x):
        return self.gaussian(self.head1(self.trunk1(x)))

    def q2(self, z1):
        return self.gaussian(self.head2(self.trunk2(z1)))

    def log_weights(self, x, k: int, kl: str = "mc"):
        """Per particle and point, shape (k, N): (log p(x | z_1), the rest of log w or of the ELBO integrand,
        the KL term of layer 1, the KL term of layer 2), with z ~ q(z | x) bottom-up."""
        mu1, s1 = self.q1(x)
        z1 = mu1 + s1 * torch.randn(k, *mu1.shape, dtype=x.dtype)
        mu2, s2 = self.q2(z1)
        z2 = mu2 + s2 * torch.randn_like(mu2)
        logits = self.decoder_x(z1)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        pm1, ps1 = self.gaussian(self.decoder_z1(z2))
        kl1 = normal_log_prob(z1, mu1, s1) - normal_log_prob(z1, pm1, ps1)
        if kl == "analytic":
            kl2 = 0.5 * (s2.pow(2) + mu2.pow(2) - 1 - 2 * s2.log()).sum(-1)
        else:
            kl2 = normal_log_prob(z2, mu2, s2) - normal_log_prob(z2, torch.zeros_like(z2), torch.ones_like(z2))
        return log_px, -(kl1 + kl2), kl1, kl2


def loss_fn(model: TwoLayerVAE, x, k: int, kl: str):
    """Minus the objective, summed over the batch: -ELBO (k = 1) or -IWAE_k."""
    log_px, rest, _, _ = model.log_weights(x, k, kl if k == 1 else "mc")
    log_w = log_px + rest
    if k == 1:
        return -log_w[0].sum()
    return -(torch.logsumexp(log_w, 0) - math.log(k)).sum()


@torch.no_grad()
def test_log_likelihood(model: TwoLayerVAE, x, num_samples: int = 5000, batch: int = 20, chunk: int = 500,
                        seed: int = EVAL_NOISE_SEED):
    """Per point: importance-sampled log p(x), the ELBO, and the two layers' KL terms (means over the draws)."""
    torch.manual_seed(seed)
    out = {"ll": [], "elbo": [], "kl1": [], "kl2": []}
    for xb in x.split(batch):
        acc, sums = None, torch.zeros(3, xb.shape[0], dtype=x.dtype)
        for start in range(0, num_samples, chunk):
            log_px, rest, kl1, kl2 = model.log_weights(xb, min(chunk, num_samples - start), "mc")
            log_w = log_px + rest
            part = torch.logsumexp(log_w, 0)
            acc = part if acc is None else torch.logaddexp(acc, part)
            sums += torch.stack([log_w.sum(0), kl1.sum(0), kl2.sum(0)])
        out["ll"].append(acc - math.log(num_samples))
        for name, total in zip(("elbo", "kl1", "kl2"), sums):
            out[name].append(total / num_samples)
    return {name: torch.cat(v) for name, v in out.items()}


@torch.no_grad()
def active_units(model: TwoLayerVAE, x) -> list[int]:
    """Per layer: units u with Cov_x(E_q[z_u | x]) > 0.01, layer 2 at q(z_2 | E[z_1 | x]) (Burda et al.)."""
    mu1, _ = model.q1(x)
    mu2, _ = model.q2(mu1)
    return [int((m.var(0) > ACTIVE_THRESHOLD).sum()) for m in (mu1, mu2)]


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float | None]:
    n = values.shape[0]
    return float(values.mean()), (float(values.std() / math.sqrt(n)) if n > 1 else None)


def init_output_bias(model: TwoLayerVAE, x_train: torch.Tensor, clamp: float = 1e-3) -> None:
    """The decoder's last bias at logit(mean training pixel), clamped to [clamp, 1 - clamp] (pyro-vae's default)."""
    p = x_train.mean(0).clamp(clamp, 1 - clamp)
    with torch.no_grad():
        model.decoder_x[-1].bias.copy_(torch.log(p) - torch.log1p(-p))


# ---------------------------------------------------------------------------------------------- training
def _checkpoint_path(args) -> Path:
    return Path(args.checkpoint) if args.checkpoint else RESULTS / "checkpoints" / f"reference_two_layer_{args.name}.pt"


def _start(args, x_train):
    """(model, optimizer, generator, history): from the checkpoint when there is one, else freshly seeded."""
    torch.manual_seed(args.seed)  # the weights
    model = TwoLayerVAE(x_train.shape[1], tuple(args.hierarchy))
    if args.output_bias == "data-mean":
        init_output_bias(model, x_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, eps=args.adam_eps, fused=True)
    generator = torch.Generator().manual_seed(args.seed)  # data order and binarization
    torch.manual_seed(args.seed)  # the noise
    history = []
    path = _checkpoint_path(args)
    if path.exists() and not args.restart:
        state = torch.load(path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
    return model, optimizer, generator, history


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.data_dir, args.val_fraction, args.seed)
    x_train = data.x_train.reshape(data.x_train.shape[0], -1).contiguous()
    model, optimizer, generator, history = _start(args, x_train)
    path = _checkpoint_path(args)
    for epoch in range(len(history) + 1, args.epochs + 1):
        t0 = time.perf_counter()
        loss = train_epoch(model, optimizer, x_train, generator, args.batch_size,
                           lambda m, xb: loss_fn(m, xb, args.k, args.kl))
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch}")
        history.append({"epoch": epoch, "train_loss": loss, "seconds": time.perf_counter() - t0})
        if args.verbose:
            print(f"epoch {epoch:4d}  loss {loss:8.3f}  {history[-1]['seconds']:6.1f} s", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history},
                   path)
    return evaluate(model, data, args, history)


def evaluate(model, data, args, history) -> dict:
    x_test = binarized_test_set(data.x_test, args.test_points)
    t0 = time.perf_counter()
    per_point = test_log_likelihood(model, x_test, args.num_samples)
    t_eval = time.perf_counter() - t0
    nll = -per_point["ll"]
    first = nll[:2000]
    train_seconds = sum(h["seconds"] for h in history)
    result = {
        "name": args.name, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "verbose")},
        "epochs": len(history), "num_train": int(data.x_train.shape[0]), "num_test": int(nll.shape[0]),
        "num_samples": int(args.num_samples),
        "test_nll": mean_and_stderr(nll)[0], "test_nll_stderr": mean_and_stderr(nll)[1],
        "test_nll_first2000": mean_and_stderr(first)[0], "test_nll_first2000_stderr": mean_and_stderr(first)[1],
        "test_elbo": float(per_point["elbo"].mean()),
        "kl_per_layer": [float(per_point["kl1"].mean()), float(per_point["kl2"].mean())],
        "active_units_per_layer": active_units(model, x_test),
        "train_seconds": train_seconds, "seconds_per_epoch": train_seconds / max(1, len(history)),
        "eval_seconds": t_eval, "history": history, "per_point_nll": [round(v, 4) for v in nll.tolist()],
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": args.threads},
    }
    return result


def parse_args(argv=None):
    p = protocol_parser(__doc__)
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--kl", choices=["mc", "analytic"], default="analytic",
                   help="the VAE's top-layer KL: closed form (pyro-vae's 'analytic' objective) or Monte Carlo")
    p.add_argument("--hierarchy", type=lambda s: [int(h) for h in s.split(",")], default=[100, 50])
    p.add_argument("--output-bias", choices=["zero", "data-mean"], default="data-mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-points", type=int, default=None, help="the first N test digits (default: all)")
    p.add_argument("--num-samples", type=int, default=5000, help="K of the test NLL")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None, help="result name (default from the settings)")
    p.add_argument("--checkpoint", default=None, help="checkpoint path (default results/checkpoints/...)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--out", default=None, help="result JSON path (default results/reference_two_layer_<name>.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: digits, 2 epochs, K=20, 50 test points")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.epochs, args.num_samples, args.test_points = "digits", 2, 20, 50
        args.hierarchy = [8, 4]
    if args.name is None:
        obj = "vae" if args.k == 1 else f"iwae{args.k}"
        args.name = f"{obj}_{args.dataset}_s{args.seed}"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = train(args)
    out = Path(args.out) if args.out else RESULTS / f"reference_two_layer_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.name}: {result['epochs']} epochs, test NLL {result['test_nll']:.3f} +- "
          f"{result['test_nll_stderr'] or 0:.3f} (first 2000: {result['test_nll_first2000']:.3f}), "
          f"active units {result['active_units_per_layer']}, {result['seconds_per_epoch']:.1f} s/epoch -> {out}")
    return result


if __name__ == "__main__":
    main()
