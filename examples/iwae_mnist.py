"""Importance-weighted autoencoders (Burda et al., 2015) with Pyro SVI: the same model and guide trained with the
ELBO and with IWAE_K (standard and DReG gradients), compared by the importance-sampled test log-likelihood.

    python examples/iwae_mnist.py                              # bundled digits
    python examples/iwae_mnist.py --dataset mnist --data-dir ../shared/data --epochs 5
    python examples/iwae_mnist.py --quick                      # a smoke run (what the tests execute)
"""
import argparse

import torch

import pyro
from pyro.infer import SVI, Trace_ELBO

import pyro_vae
from pyro_vae.evaluation import active_units, log_likelihood
from pyro_vae.objectives import IWAEELBO


def train(data, objective, args):
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    big = data.input_shape[-1] == 28
    vae = pyro_vae.VAE(input_shape=data.input_shape, z_dim=50 if big else 8,
                       hidden=(200, 200) if big else (128, 128), activation="tanh")
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": args.lr}), objective)
    x_train = data.x_train[: args.train_points]
    with pyro.validation_enabled(False):
        for epoch in range(args.epochs):
            for xb in torch.bernoulli(x_train)[torch.randperm(len(x_train))].split(args.batch_size):
                svi.step(xb)
    return vae


def main(argv=None):
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
    rows = {}
    print(f"| model | test NLL (K={args.num_samples}) | active units |\n|---|---|---|")
    for name, objective in objectives.items():
        vae = train(data, objective, args)
        with torch.no_grad():
            ll = log_likelihood(vae.model, vae.guide, x_test, num_samples=args.num_samples, progress=False)
            rows[name] = float(-ll.mean())
            print(f"| {name} | {rows[name]:.2f} ± {float(ll.std()) / len(ll) ** 0.5:.2f} | "
                  f"{int(active_units(vae, x_test))} |")
    return rows


if __name__ == "__main__":
    main()
