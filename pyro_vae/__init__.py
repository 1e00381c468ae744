"""pyro-vae: variational autoencoders the Pyro way.

The decoder is a Pyro *model*, the encoder a Pyro *guide*, training is stochastic variational inference::

    vae = pyro_vae.VAE(input_shape=(1, 28, 28), z_dim=20, likelihood="bernoulli")
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    loss = svi.step(x)
"""
from . import evaluation, objectives, particles  # noqa: F401  (importing objectives registers the KL pairs)
from .conditional import ConditionalVAE
from .config import RunConfig
from .data import DataError, Dataset, load_dataset
from .hierarchical import HierarchicalVAE
from .guides import (CholeskyNormal, DiagonalLaplace, DiagonalNormal, DiagonalStudentT, IAFNormal, LowRankNormal,
                     PosteriorFamily, make_posterior)
from .likelihoods import Likelihood, make_likelihood
from .objectives import AnalyticKLELBO, IWAEELBO, MonteCarloELBO, RenyiBound, make_objective
from .particles import Particles
from .priors import FlowPrior, MixturePrior, Prior, VampPrior, make_prior
from .runs import Run, evaluate_run, load_run, resume_run, train_run
from .semisupervised import SemiSupervisedVAE
from .training import fit
from .vae import VAE

__version__ = "0.1.0"

__all__ = [
    "VAE", "ConditionalVAE", "HierarchicalVAE", "SemiSupervisedVAE",
    "Prior", "MixturePrior", "VampPrior", "FlowPrior", "make_prior",
    "PosteriorFamily", "DiagonalNormal", "CholeskyNormal", "LowRankNormal", "IAFNormal", "DiagonalLaplace",
    "DiagonalStudentT", "make_posterior", "Likelihood", "make_likelihood",
    "Particles", "MonteCarloELBO", "AnalyticKLELBO", "IWAEELBO", "RenyiBound", "make_objective",
    "objectives", "evaluation", "particles",
    "RunConfig", "Run", "load_run", "evaluate_run", "fit", "train_run", "resume_run",
    "load_dataset", "Dataset", "DataError",
]
