"""Importance-weighted autoencoders (Burda et al., 2015) with Pyro SVI: the same model and guide trained with the
ELBO and with IWAE_K (standard and DReG gradients), compared by the importance-sampled test log-likelihood.

    python examples/iwae_mnist.py                              # bundled digits
    python examples/iwae_mnist.py --dataset mnist --data-dir ../shared/data --epochs 5
    python examples/iwae_mnist.py --quick                      # a smoke run (what the tests execute)

Every row starts from the same initial weights (the seed), so each is compared with that untrained model on
the same test points: "learned" is the mean per-point gain in log p(x), trained minus untrained, with the
standard error of that paired difference. The IWAE rows are also compared with the Trace_ELBO row in the same
way ("vs ELBO": IWAE's log p(x) minus the ELBO-trained model's, per point).

On the bundled digits the IWAE rows beat the Trace_ELBO row at the start and at the end of training, not in
between. With the default 40 epochs (K=2000), IWAE k=5 leads by +0.76 ± 0.07 nats per digit and DReG by
+0.99 ± 0.09, with 8 active units against 3. After the quick mode's four steps they lead by +0.19 ± 0.04 and
+0.21 ± 0.03 (between +0.08 and +0.23 for seeds 1 to 3; each IWAE step averages 5 particles per digit where
Trace_ELBO draws one). After 5 epochs (``--epochs 5 --num-samples 200``) they are slightly behind, -0.06 ± 0.03
and -0.03 ± 0.03: all three models are still far from converged (27 nats against 24 after 40 epochs). Every row
beats its untrained model in every mode.
"""
import argparse

import torch

import pyro
from pyro.infer import SVI, Trace_ELBO

import pyro_vae
from pyro_vae.analysis import mean_and_stderr
from pyro_vae.evaluation import active_units, log_likelihood
from pyro_vae.objectives import IWAEELBO


def make_vae(data, seed):
    """The model every row trains, its initial weights drawn from ``seed``."""
    pyro.set_rng_seed(seed)
    big = data.input_shape[-1] == 28
    return pyro_vae.VAE(input_shape=data.input_shape, z_dim=50 if big else 8,
                        hidden=(200, 200) if big else (128, 128), activation="tanh")


def train(data, objective, args):
    pyro.clear_param_store()
    vae = make_vae(data, args.seed)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": args.lr}), objective)
    x_train = data.x_train[: args.train_points]
    with pyro.validation_enabled(False):
        for epoch in range(args.epochs):
            for xb in torch.bernoulli(x_train)[torch.randperm(len(x_train))].split(args.batch_size):
                svi.step(xb)
    return vae


def main(argv=None):
    """Train one VAE per objective; per row (a dict) the test NLL with its standard error, the untrained model's
    NLL, ``learned`` ({mean, stderr} of the per-point log p(x) gain over the untrained model) and, for the IWAE
    rows, ``vs_elbo`` ({mean, stderr} of the per-point log p(x) gain over the Trace_ELBO row's model)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k", type=int, default=5, help="importance samples for training")
    p.add_argument("--num-samples", type=int, default=2000, help="importance samples for the test NLL")
    p.add_argument("--train-points", type=int, default=None)
    p.add_argument("--test-points", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.num_samples, args.test_points, args.train_points = 1, 20, 30, 256
    data = pyro_vae.load_dataset(args.dataset, args.data_dir)
    x_test = torch.bernoulli(data.x_test[: args.test_points], generator=torch.Generator().manual_seed(0))
    objectives = {
        "VAE (Trace_ELBO)": Trace_ELBO(),
        f"IWAE k={args.k}": IWAEELBO(num_particles=args.k),
        f"IWAE k={args.k}, DReG": IWAEELBO(num_particles=args.k, estimator="dreg"),
    }

    def log_px(vae):  # log p(x) per test point, shape (N,), from the same random stream for every model
        torch.manual_seed(args.seed)
        with torch.no_grad():
            return log_likelihood(vae.model, vae.guide, x_test, num_samples=args.num_samples, progress=False)

    untrained = log_px(make_vae(data, args.seed))
    rows, ll = {}, {}
    print(f"| model | test NLL (K={args.num_samples}) | untrained | learned | vs ELBO | active units |\n"
          "|---|---|---|---|---|---|")
    for name, objective in objectives.items():
        vae = train(data, objective, args)
        ll[name] = log_px(vae)
        row = rows[name] = {"nll": float(-ll[name].mean()), "stderr": float(ll[name].std()) / len(x_test) ** 0.5,
                            "untrained_nll": float(-untrained.mean()),
                            "learned": mean_and_stderr(ll[name] - untrained),
                            "active_units": int(active_units(vae, x_test))}
        if name != "VAE (Trace_ELBO)":
            row["vs_elbo"] = mean_and_stderr(ll[name] - ll["VAE (Trace_ELBO)"])
        vs_elbo = f"{row['vs_elbo']['mean']:+.2f} ± {row['vs_elbo']['stderr']:.2f}" if "vs_elbo" in row else ""
        print(f"| {name} | {row['nll']:.2f} ± {row['stderr']:.2f} | {row['untrained_nll']:.2f} | "
              f"{row['learned']['mean']:+.2f} ± {row['learned']['stderr']:.2f} | {vs_elbo} | {row['active_units']} |")
    return rows


if __name__ == "__main__":
    main()
