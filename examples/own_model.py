"""Your own Pyro model, first-class: the VAE of Pyro's tutorial (pyro.ai/examples/vae.html) as you would write it,
trained, evaluated and decomposed by pyro-vae without a line of pyro-vae in the model (docs/own-model.md).

    python examples/own_model.py             # about a minute on 2 CPU cores
    python examples/own_model.py --quick     # a smoke run (what the tests execute)

The same from the command line (the run keeps a copy of this file; loading the run runs it: --trust-code)::

    pyro-vae train --model examples/own_model.py:TutorialVAE --model-kwargs '{"z_dim": 4}' --binarize dynamic \\
        --epochs 50 --out runs/own
    pyro-vae evaluate runs/own --trust-code       # test ELBO, NLL (K = 5000), active units, KL per dimension
    pyro-vae gaps runs/own --trust-code           # amortization and approximation gaps
"""
import argparse
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

import pyro
import pyro.distributions as dist


class TutorialVAE(nn.Module):
    """p(z) = N(0, I), p(x|z) = Bernoulli(decoder(z)); q(z|x) = N(mu(x), diag sigma(x)^2)."""

    def __init__(self, input_shape=(1, 28, 28), z_dim=10, hidden=200):
        super().__init__()
        self.input_shape, self.z_dim = tuple(input_shape), z_dim
        x_dim = math.prod(self.input_shape)
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Softplus(), nn.Linear(hidden, x_dim))

    def model(self, x=None, batch_size=None):
        """Generates the batch when x is None (batch_size points): what sampling needs."""
        pyro.module("decoder", self.decoder)
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(self.decoder[0].weight.new_zeros(n, self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1),
                        obs=None if x is None else x.reshape(n, -1))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        loc, raw_scale = self.encoder(x.reshape(x.shape[0], -1)).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, F.softplus(raw_scale) + 1e-4).to_event(1))


def main(argv=None) -> dict:
    import pyro_vae
    from pyro_vae import analysis, evaluation
    from pyro_vae.data import prepare_eval_data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 epoch (captured, not compiled), small evaluation")
    args = p.parse_args(argv)
    epochs, points, K, steps = (1, 60, 100, 20) if args.quick else (50, 359, 5000, 300)
    data = pyro_vae.load_dataset("digits")
    pyro.set_rng_seed(0)
    vae = TutorialVAE(input_shape=data.input_shape, z_dim=4, hidden=64)
    untrained = copy.deepcopy(vae)
    # training: the model and guide as written, captured into one compiled graph (compile=True); the quick mode
    # runs the captured graph without Inductor (compile="graph"), whose one-off compile would dominate one epoch
    history = pyro_vae.fit(vae, data.x_train, data.x_val, epochs=epochs, batch_size=32, lr=3e-3,
                           binarize_mode="dynamic", compile="graph" if args.quick else True, progress=False)
    x = prepare_eval_data(vae, data.x_test, "dynamic")[:points]
    torch.manual_seed(0)
    elbo = evaluation.elbo(vae.model, vae.guide, x, num_particles=10)
    untrained_elbo = evaluation.elbo(untrained.model, untrained.guide, x, num_particles=10)
    log_px = evaluation.log_likelihood(vae.model, vae.guide, x, num_samples=K, progress=False)
    result = {"captured": "capture_seconds" in history[0], "val_elbo": history[-1]["val_elbo"], "test_elbo": float(elbo.mean()), "test_nll": float(-log_px.mean()),
              "learned": analysis.mean_and_stderr(elbo - untrained_elbo),
              "latent_sites": evaluation.latent_site_statistics(vae.model, vae.guide, x),
              # the inference gap log p(x) - ELBO, split by per-point posteriors over all local latents
              "gaps": analysis.model_inference_gaps(vae.model, vae.guide, x[:points // 2], steps=steps,
                                                    num_samples=K, elbo_particles=20 if args.quick else 100, lr=0.05)}
    print(f"test ELBO {result['test_elbo']:.2f}, NLL {result['test_nll']:.2f} nats (K = {K}); trained - untrained "
          f"ELBO {result['learned']['mean']:.2f} ± {result['learned']['stderr']:.2f}")
    print(analysis.gaps_markdown(result["gaps"]))
    return result


if __name__ == "__main__":
    main()
