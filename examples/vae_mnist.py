"""A VAE in Pyro, in the style of Pyro's own examples/vae/vae.py, on digits (bundled) or MNIST.

    python examples/vae_mnist.py                       # 8x8 digits, no download
    python examples/vae_mnist.py --dataset mnist --data-dir ../shared/data --epochs 20
    python examples/vae_mnist.py --quick               # a few steps (what the tests run)

The decoder is the Pyro model, the encoder the Pyro guide, and training is plain ``pyro.infer.SVI``. At the end
the trained model is compared with itself untrained (a copy of its initial weights) on the same test points:
the mean per-point gain in the ELBO and the standard error of that paired difference.
"""
import argparse
import copy

import torch

import pyro
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

import pyro_vae
from pyro_vae.analysis import mean_and_stderr


def elbo_per_point(vae, x_test, seed):
    """The ELBO of each test point (10 particles each), drawn from the same random stream for every model."""
    torch.manual_seed(seed)
    return pyro_vae.evaluation.elbo(vae.model, vae.guide, x_test, num_particles=10)


def main(argv=None):
    """Train by SVI; returns ``test_elbo`` and ``untrained_elbo`` (nats per test point) and ``learned``, the
    {mean, stderr} of the per-point ELBO gain, trained minus untrained."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion-mnist", "kmnist"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--z-dim", type=int, default=None)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a couple of epochs on a subset (for tests)")
    args = parser.parse_args(argv)

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = pyro_vae.load_dataset(args.dataset, args.data_dir, seed=args.seed)
    x_train, x_test = data.x_train, data.x_test
    if args.quick:
        x_train, x_test, args.epochs = x_train[:256], x_test[:128], 2
    z_dim = args.z_dim or (20 if data.input_shape[-1] == 28 else 8)
    hidden = (400,) if data.input_shape[-1] == 28 else (128,)

    # the decoder is p(x|z) = Bernoulli(logits = decoder(z)): binarize the test set once, the train set per epoch
    x_test = torch.bernoulli(x_test, generator=torch.Generator().manual_seed(0))
    vae = pyro_vae.VAE(input_shape=data.input_shape, z_dim=z_dim, hidden=hidden, likelihood="bernoulli")
    untrained = copy.deepcopy(vae)  # the same initial weights, to show what training gained
    svi = SVI(vae.model, vae.guide, Adam({"lr": args.lr}), Trace_ELBO())

    for epoch in range(1, args.epochs + 1):
        epoch_loss = 0.0
        x_bin = torch.bernoulli(x_train)  # dynamic binarization
        for xb in x_bin[torch.randperm(len(x_bin))].split(args.batch_size):
            epoch_loss += svi.step(xb)
        test_loss = sum(svi.evaluate_loss(xb) for xb in x_test.split(512))
        print(f"epoch {epoch:3d}  train ELBO {-epoch_loss / len(x_bin):8.3f}  "
              f"test ELBO {-test_loss / len(x_test):8.3f}  (nats per data point)")

    trained_elbo = elbo_per_point(vae, x_test, args.seed)
    untrained_elbo = elbo_per_point(untrained, x_test, args.seed)
    learned = mean_and_stderr(trained_elbo - untrained_elbo)
    print(f"test ELBO {float(trained_elbo.mean()):.3f}, untrained {float(untrained_elbo.mean()):.3f}: learned "
          f"{learned['mean']:+.3f} ± {learned['stderr']:.3f} nats per data point (paired over {len(x_test)} points)")
    return {"test_elbo": float(trained_elbo.mean()), "untrained_elbo": float(untrained_elbo.mean()),
            "learned": learned}


if __name__ == "__main__":
    main()
