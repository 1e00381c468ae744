"""A VAE in Pyro, in the style of Pyro's own examples/vae/vae.py, on digits (bundled) or MNIST.

    python examples/vae_mnist.py                       # 8x8 digits, no download
    python examples/vae_mnist.py --dataset mnist --data-dir ../shared/data --epochs 20
    python examples/vae_mnist.py --quick               # a few steps (what the tests run)

The decoder is the Pyro model, the encoder the Pyro guide, and training is plain ``pyro.infer.SVI``.
"""
import argparse

import torch

import pyro
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

import pyro_vae


def main(argv=None):
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
    svi = SVI(vae.model, vae.guide, Adam({"lr": args.lr}), Trace_ELBO())

    for epoch in range(1, args.epochs + 1):
        epoch_loss = 0.0
        x_bin = torch.bernoulli(x_train)  # dynamic binarization
        for xb in x_bin[torch.randperm(len(x_bin))].split(args.batch_size):
            epoch_loss += svi.step(xb)
        test_loss = sum(svi.evaluate_loss(xb) for xb in x_test.split(512))
        print(f"epoch {epoch:3d}  train ELBO {-epoch_loss / len(x_bin):8.3f}  "
              f"test ELBO {-test_loss / len(x_test):8.3f}  (nats per data point)")
    return -test_loss / len(x_test)


if __name__ == "__main__":
    main()
