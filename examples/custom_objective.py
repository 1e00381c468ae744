"""Adding an objective: one formula of the particles and a small class. Here CIWAE (Rainforth et al., ICML 2018,
"Tighter variational bounds are not necessarily better"), the convex combination of the ELBO and IWAE_K,

    CIWAE_{beta,K}(x) = beta * ELBO_K(x) + (1 - beta) * IWAE_K(x),

computed from the same K particles. The new objective works with Pyro's SVI on any model/guide (through
traces), with ``pyro_vae.fit`` on a VAE's trace-free twin (fast), and, once registered, it is a choice of
``--objective`` for ``pyro_vae.cli.main([...])`` called in the same process.

    python examples/custom_objective.py            # a few seconds on the bundled digits
    python examples/custom_objective.py --quick    # a smoke run (what the tests execute)

Each objective trains the same initial weights, so each is compared with that untrained model on the same test
points: "learned" is the mean per-point gain in log p(x), trained minus untrained, with its paired standard error.
"Untrained" is where fit starts: the initial weights with the decoder's output bias at the mean training image
(``fit(..., epochs=0)``), so the gain is what the optimizer's steps added.
"""
import argparse

import torch

import pyro_vae
from pyro_vae.analysis import mean_and_stderr
from pyro_vae.evaluation import log_likelihood
from pyro_vae.objectives import ParticleObjective, register_objective
from pyro_vae.objectives.bounds import elbo, renyi


class CIWAE(ParticleObjective):
    """beta * ELBO_K + (1 - beta) * IWAE_K from one draw of K particles per data point."""

    def __init__(self, num_particles: int = 5, beta: float = 0.5, **kwargs):
        super().__init__(num_particles=num_particles, **kwargs)
        self.beta = float(beta)

    def bound(self, particles):
        elbo_value, _ = elbo(particles)
        iwae_value, _ = renyi(particles, alpha=0.0)
        value = self.beta * elbo_value + (1 - self.beta) * iwae_value
        return value, value


register_objective("ciwae", CIWAE, options=("num_particles", "beta"), summary="beta ELBO + (1 - beta) IWAE_K")


def make_vae(data):
    """The VAE every objective trains, from the same initial weights."""
    torch.manual_seed(0)
    return pyro_vae.VAE(data.input_shape, z_dim=8, hidden=(256,))


def log_likelihood_per_point(vae, x_test, num_samples):
    """log p(x) of each test point by importance sampling, from the same random stream for every model."""
    torch.manual_seed(1)
    with torch.no_grad():
        return log_likelihood(vae.model, vae.guide, x_test, num_samples=num_samples, progress=False)


def main(argv=None):
    """Train a VAE with each objective; per objective (a dict) the test NLL, its standard error, the untrained
    model's NLL and ``learned``: {mean, stderr} of the per-point log p(x) gain over the untrained model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    epochs, num_samples = (1, 20) if args.quick else (args.epochs, 500)
    data = pyro_vae.load_dataset("digits")
    x_test = pyro_vae.data.prepare_eval_data(pyro_vae.VAE(data.input_shape), data.x_test)
    untrained_vae = make_vae(data)
    pyro_vae.fit(untrained_vae, data.x_train, epochs=0, progress=False)  # fit's starting point, no step taken
    untrained = log_likelihood_per_point(untrained_vae, x_test, num_samples)
    results = {}
    for name, options in [("elbo", {}), ("iwae", {"num_particles": 5}), ("ciwae", {"num_particles": 5})]:
        vae = make_vae(data)
        pyro_vae.fit(vae, data.x_train, data.x_val, objective=name, epochs=epochs, batch_size=64, progress=False,
                     **options)
        ll = log_likelihood_per_point(vae, x_test, num_samples)
        r = results[name] = {"nll": float(-ll.mean()), "stderr": float(ll.std()) / len(ll) ** 0.5,
                             "untrained_nll": float(-untrained.mean()), "learned": mean_and_stderr(ll - untrained)}
        print(f"{name:6s} test NLL {r['nll']:.2f} ± {r['stderr']:.2f} nats (untrained {r['untrained_nll']:.2f}: "
              f"learned {r['learned']['mean']:+.2f} ± {r['learned']['stderr']:.2f})")
    return results


if __name__ == "__main__":
    main()
