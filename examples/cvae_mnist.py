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

Every trained model is compared with its untrained copy on the same test points: "learned" is the mean per-image
gain in the (conditional) log-likelihood, trained minus untrained, with its paired standard error. "Untrained" is
where fit starts: the initial weights with the decoder's output bias at the mean training image
(``fit(..., epochs=0)``), so the gain is what the optimizer's steps added.
"""
import argparse
import copy
import tempfile
from pathlib import Path

import torch

import pyro_vae
from pyro_vae.analysis import mean_and_stderr
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


def compare(vae, untrained, test_args: tuple, num_samples: int) -> dict:
    """-log p(x | c) per test image by importance sampling (K = ``num_samples``, the same random stream for both
    models, leaving the training's stream as it was): the trained model's mean ``nll`` and ``stderr``, the
    ``untrained_nll``, and ``learned``, the {mean, stderr} of the per-image log-likelihood gain, trained minus
    untrained."""
    ll = {}
    for name, model in (("trained", vae), ("untrained", untrained)):
        with torch.random.fork_rng():
            torch.manual_seed(1)
            ll[name] = log_likelihood(model.model, model.guide, test_args, num_samples=num_samples, progress=False)
    trained = ll["trained"]
    return {"nll": float(-trained.mean()), "stderr": float(trained.std() / len(trained) ** 0.5),
            "untrained_nll": float(-ll["untrained"].mean()), "learned": mean_and_stderr(trained - ll["untrained"])}


def labels_task(data, args, out: Path):
    vae = ConditionalVAE(data.input_shape, num_classes=10, z_dim=args.z_dim, hidden=(args.hidden,))
    untrained = copy.deepcopy(vae)
    pyro_vae.fit(untrained, (data.x_train, data.y_train), epochs=0, progress=False)  # fit's starting point
    pyro_vae.fit(vae, (data.x_train, data.y_train), (data.x_val, data.y_val), epochs=args.epochs, lr=3e-3,
                 batch_size=64, progress=not args.quick)
    path = save_samples(vae, out / f"label-{args.label}.png", 64, label=args.label)
    print(f"64 samples of the digit {args.label}: {path}")
    x_test = prepare_eval_data(vae, data.x_test[: args.test_points])
    result = {"vae": vae, **compare(vae, untrained, (x_test, data.y_test[: len(x_test)]), args.num_samples)}
    print(f"test -log p(x | label) (IS, K={args.num_samples}): {result['nll']:.2f} ± {result['stderr']:.2f}, "
          f"untrained {result['untrained_nll']:.2f}: learned {result['learned']['mean']:+.2f} ± "
          f"{result['learned']['stderr']:.2f} nats")
    return result


def quadrants_task(data, args, out: Path):
    results = {}
    for given in (1, 2, 3):
        vae = ConditionalVAE(data.input_shape, condition_shape=data.input_shape, z_dim=args.z_dim,
                             hidden=(args.hidden,), prior="learned", missing_value=-1.0)
        # the condition shows the given quadrants in grayscale; the targets are binarized dynamically by fit
        train = (data.x_train, quadrant_condition(data.x_train, given))
        untrained = copy.deepcopy(vae)
        pyro_vae.fit(untrained, train, epochs=0, progress=False)  # fit's starting point, no step taken
        pyro_vae.fit(vae, train, epochs=args.epochs, lr=1e-3, batch_size=64, progress=False)
        x_gray = data.x_test[: args.test_points]
        x_test, c_test = prepare_eval_data(vae, x_gray), quadrant_condition(x_gray, given)
        results[given] = compare(vae, untrained, (x_test, c_test), args.num_samples)
    print("| quadrants given | -log p(missing | given), ours (IS, K=%d) | untrained | learned | "
          "Pyro tutorial CVAE (MNIST) |" % args.num_samples)
    print("|---|---|---|---|---|")
    for given, r in results.items():
        print(f"| {given} | {r['nll']:.2f} ± {r['stderr']:.2f} | {r['untrained_nll']:.2f} | "
              f"{r['learned']['mean']:+.2f} ± {r['learned']['stderr']:.2f} | {PYRO_TUTORIAL_CVAE[given]} |")
    return results


def main(argv=None):
    """``labels``: the class-conditional VAE (``vae``) and its test NLL against its untrained copy; ``quadrants``:
    per number of quadrants given, the same comparison for -log p(missing | given) (see :func:`compare`)."""
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
        args.task, args.epochs, args.num_samples = "both", 1, 10  # every test digit: the gains are small
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
