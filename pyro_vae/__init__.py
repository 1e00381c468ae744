"""pyro-vae: variational autoencoders the Pyro way.

The decoder is a Pyro *model*, the encoder a Pyro *guide*, training is stochastic variational inference::

    vae = pyro_vae.VAE(input_shape=(1, 28, 28), z_dim=20, likelihood="bernoulli")
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    loss = svi.step(x)
"""
from . import evaluation, objectives  # noqa: F401  (importing objectives registers the KL pairs)
from .config import RunConfig
from .data import DataError, Dataset, load_dataset
from .guides import make_posterior
from .likelihoods import make_likelihood
from .runs import Run, evaluate_run, load_run
from .training import fit, train_run
from .conditional import ConditionalVAE
from .vae import VAE

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "ConditionalVAE",
    "objectives",
    "evaluation",
    "RunConfig",
    "Run",
    "load_run",
    "evaluate_run",
    "fit",
    "train_run",
    "load_dataset",
    "Dataset",
    "DataError",
    "make_likelihood",
    "make_posterior",
]
