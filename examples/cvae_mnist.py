"""Conditional VAEs (Sohn, Lee & Yan, 2015), two ways.

1. ``--task labels``: condition on the class label and "generate only the digit 2".
2. ``--task quadrants``: the structured-output task of Pyro's CVAE tutorial. Given 1, 2 or 3 quadrants of a digit
   (1: top-left; 2: the top half; 3: all but the bottom-right), predict the rest. The condition is the image with
   the unobserved pixels set to -1 (the given ones in grayscale), the prior p(z|c) is a network, the likelihood covers the missing pixels only.
   Reported: -log p(x_missing | x_given) per image, estimated by importance sampling with K samples from the
   recognition network q(z|x, c), beside the Pyro tutorial's CVAE numbers (ELBO-based upper bounds).

    python examples/cvae_mnist.py --task labels --label 2
    python examples/cvae_mnist.py --task quadrants --dataset mnist --data-dir ../shared/data --epochs 10
    python examples/cvae_mnist.py --quick           # both tasks, tiny (what the tests execute)
"""
import argparse
import tempfile
from pathlib import Path

import torch

import pyro_vae
from pyro_vae.conditional import ConditionalVAE
from pyro_vae.evaluation import log_likelihood
from pyro_vae.plots import save_samples
from pyro_vae.training import prepare_eval_data

PYRO_TUTORIAL_CVAE = {1: 71.8, 2: 51.0, 3: 24.2}  # MNIST, nats, from the Pyro CVAE tutorial (ELBO-based)


def quadrant_condition(x: torch.Tensor, given: int) -> torch.Tensor:
    """The image with the quadrants not given set to -1 (1: top-left; 2: top half; 3: all but bottom-right)."""
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    c = torch.full_like(x, -1.0)
    shown = [(0, 0), (0, 1), (1, 0)][:given]
    for i, j in shown:
        c[..., i * h:(i + 1) * h, j * w:(j + 1) * w] = x[..., i * h:(i + 1) * h, j * w:(j + 1) * w]
    return c


def labels_task(data, args, out: Path):
    vae = ConditionalVAE(data.input_shape, num_classes=10, z_dim=args.z_dim, hidden=(args.hidden,))
    pyro_vae.fit(vae, (data.x_train, data.y_train), (data.x_val, data.y_val), epochs=args.epochs, lr=3e-3,
                 batch_size=64, progress=not args.quick)
    path = save_samples(vae, out / f"label-{args.label}.png", 64, label=args.label)
    print(f"64 samples of the digit {args.label}: {path}")
    return vae


def quadrants_task(data, args, out: Path):
    results = {}
    for given in (1, 2, 3):
        vae = ConditionalVAE(data.input_shape, condition_shape=data.input_shape, z_dim=args.z_dim,
                             hidden=(args.hidden,), prior="learned", missing_value=-1.0)
        # the condition shows the given quadrants in grayscale; the targets are binarized dynamically by fit
        pyro_vae.fit(vae, (data.x_train, quadrant_condition(data.x_train, given)), epochs=args.epochs, lr=1e-3,
                     batch_size=64, progress=False)
        x_gray = data.x_test[: args.test_points]
        x_test, c_test = prepare_eval_data(vae, x_gray), quadrant_condition(x_gray, given)
        ll = log_likelihood(vae.model, vae.guide, (x_test, c_test), num_samples=args.num_samples, progress=False)
        results[given] = (float(-ll.mean()), float(ll.std() / len(ll) ** 0.5))
    print("| quadrants given | -log p(missing | given), ours (IS, K=%d) | Pyro tutorial CVAE (MNIST) |"
          % args.num_samples)
    print("|---|---|---|")
    for given, (nll, se) in results.items():
        print(f"| {given} | {nll:.2f} ± {se:.2f} | {PYRO_TUTORIAL_CVAE[given]} |")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="labels", choices=["labels", "quadrants", "both"])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--z-dim", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--label", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--test-points", type=int, default=1000)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.task, args.epochs, args.num_samples, args.test_points = "both", 1, 10, 20
    torch.manual_seed(0)
    data = pyro_vae.load_dataset(args.dataset, args.data_dir)
    out = Path(args.out or tempfile.mkdtemp(prefix="cvae-"))
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    if args.task in ("labels", "both"):
        result["labels"] = labels_task(data, args, out)
    if args.task in ("quadrants", "both"):
        result["quadrants"] = quadrants_task(data, args, out)
    return result


if __name__ == "__main__":
    main()
