"""The Burda et al. (2015) one-layer setup trained by pyro-vae itself, for comparison with reference_burda.py.

What ``pyro-vae train --dataset mnist --z-dim 50 --hidden 200,200 --activation tanh --batch-size 100 --lr 1e-3
--objective elbo`` does (``pyro_vae.fit`` on the same split, seed and binarization), then the test NLL by
``pyro_vae.evaluation.log_likelihood`` (K importance samples) on the first ``--test-points`` test digits,
binarized once as ``prepare_eval_data`` does. The trained networks are also copied into
``reference_burda.ReferenceVAE`` and evaluated by its hand-written estimator with the same noise seed as the
reference runs, so the per-point NLLs pair with theirs (``per_point_nll``; pyro-vae's own estimate is
``pyro_vae_nll``). ``--output-bias data-mean`` sets pyro-vae's decoder output bias to the logit of the mean
training pixel before training (the candidate fix, applied from outside the library). The objective and the
output-bias init are always passed explicitly (``init_output_bias="default"`` where ``fit`` takes it), so the
runs mean the same thing before and after pyro-vae's defaults changed (commit 90ba28e: data-mean bias,
closed-form KL).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/burda_pyro_vae.py --data-dir /work/shared/data \\
        --epochs 30 --name pyrovae_vae_e30
    python benchmarks/burda_pyro_vae.py --quick
"""
from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from pathlib import Path

import torch

import pyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_burda import (ReferenceVAE, binarized_test_set, latent_statistics,  # noqa: E402
                             output_bias_logits, test_log_likelihood, write_result)

from pyro_vae import VAE, fit  # noqa: E402
from pyro_vae.data import load_dataset  # noqa: E402
from pyro_vae.evaluation import log_likelihood  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--k", type=int, default=1, help="1: --objective elbo; k > 1: --objective iwae --num-particles k")
    p.add_argument("--objective", default=None, help="override the objective name (e.g. analytic)")
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--output-bias", choices=["zero", "data-mean"], default="zero",
                   help="data-mean: set pyro-vae's decoder output bias to logit(mean training pixel) before fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-points", type=int, default=2000)
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None)
    p.add_argument("--no-pyro-eval", action="store_true",
                   help="skip pyro-vae's own log_likelihood (the reference estimator is always run)")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/reference_burda_<name>.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: digits, 1 epoch, K=20, 50 test points")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.epochs, args.num_samples, args.test_points = "digits", 1, 20, 50
    args.name = args.name or f"pyrovae_{'vae' if args.k == 1 else f'iwae{args.k}'}_{args.dataset}_e{args.epochs}"
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    data = load_dataset(args.dataset, args.data_dir, args.val_fraction, args.seed)
    pyro.set_rng_seed(args.seed)  # as runs.train_run: the initial weights depend on the seed only
    vae = VAE(input_shape=data.input_shape, z_dim=50, likelihood="bernoulli", guide="diagonal", hidden=(200, 200),
              activation="tanh")
    if args.output_bias == "data-mean":  # the candidate fix, applied from outside the library
        with torch.no_grad():
            vae.decoder.net[-1].bias.copy_(output_bias_logits(data.x_train.reshape(data.x_train.shape[0], -1)))
    objective = args.objective or ("elbo" if args.k == 1 else "iwae")
    options = {} if args.k == 1 else {"num_particles": args.k}
    if "init_output_bias" in inspect.signature(fit).parameters:
        # newer pyro-vae initializes the output bias itself (default "data-mean"): keep exactly the bias set above
        # (PyTorch's default init for --output-bias zero), so both settings are what their names say
        options["init_output_bias"] = "default"
    t0 = time.perf_counter()
    history = fit(vae, data.x_train, data.x_val, objective=objective, epochs=args.epochs, batch_size=100, lr=1e-3,
                  seed=args.seed, device="cpu", progress=False, adam_eps=args.adam_eps, **options)
    t_train = time.perf_counter() - t0

    x_test = binarized_test_set(data.x_test, args.test_points)
    vae.eval()
    t0 = time.perf_counter()
    ll_pyro = None if args.no_pyro_eval else log_likelihood(vae.model, vae.guide, x_test.reshape(-1, *data.input_shape),
                                                            num_samples=args.num_samples, progress=False)
    t_eval = time.perf_counter() - t0
    ref = ReferenceVAE(x_test.shape[1], (200, 200), 50, "softplus")
    ref.encoder.load_state_dict(vae.encoder.net.state_dict())
    ref.decoder.load_state_dict(vae.decoder.net.state_dict())
    ll_ref, elbo = test_log_likelihood(ref, x_test, args.num_samples)
    n = x_test.shape[0]
    nll = -ll_ref
    result = {
        **latent_statistics(ref, x_test), "name": args.name, "settings": vars(args),
        "num_train": int(data.x_train.shape[0]), "num_test": n, "num_samples": args.num_samples,
        "test_nll": float(nll.mean()), "test_nll_stderr": float(nll.std() / math.sqrt(n)),
        "test_elbo": float(elbo.mean()), "test_elbo_stderr": float(elbo.std() / math.sqrt(n)),
        "train_seconds": t_train, "seconds_per_epoch": t_train / max(1, args.epochs), "pyro_eval_seconds": t_eval,
        "history": [{k: m[k] for k in ("epoch", "train_loss", "val_elbo", "seconds") if k in m} for m in history],
        "per_point_nll": [round(v, 4) for v in nll.tolist()],
        "per_point_elbo": [round(v, 4) for v in elbo.tolist()],
    }
    if ll_pyro is not None:
        result.update(pyro_vae_nll=float(-ll_pyro.mean()), pyro_vae_nll_stderr=float(ll_pyro.std() / math.sqrt(n)),
                      per_point_nll_pyro_vae=[round(v, 4) for v in (-ll_pyro).tolist()])
    write_result(result, args, f"test NLL (reference estimator) {result['test_nll']:.3f} "
                               f"+- {result['test_nll_stderr']:.3f}, pyro-vae log_likelihood "
                               f"{result.get('pyro_vae_nll', float('nan')):.3f}, test ELBO {result['test_elbo']:.3f}, "
                               f"{result['seconds_per_epoch']:.1f} s/epoch")
    return result


if __name__ == "__main__":
    main()
