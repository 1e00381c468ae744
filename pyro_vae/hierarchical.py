r"""A VAE with L Gaussian stochastic layers z_1 .. z_L, written as two plain Pyro programs (no twin).

**Model** (one sample site per layer, names ``"z1"`` .. ``"zL"``, inside the data plate ``"data"``)::

    p(x, z) = p(z_L) prod_{l<L} p(z_l | z_{l+1}) p(x | z_1),
    p(z_l | z_{l+1}) = N(z_l; mu_p,l(z_{l+1}), diag sigma_p,l(z_{l+1})^2)          (an MLP between layers)

with p(z_L) = N(0, I) or a learned prior (:mod:`pyro_vae.priors`) and p(x|z_1) any likelihood of
:mod:`pyro_vae.likelihoods`.

**Guide**, two inference directions:

* ``inference="bottom-up"`` (Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016):
  q(z|x) = q(z_1 | x) prod_{l>1} q(z_l | z_{l-1}), each N(mu_q,l, diag sigma_q,l^2) from an MLP of the layer
  below, sampled bottom-up.
* ``inference="top-down"``, the ladder VAE (Sønderby et al., "Ladder Variational Autoencoders", NeurIPS 2016):
  a deterministic bottom-up pass d_1 = MLP_1(x), d_l = MLP_l(d_{l-1}) gives per layer a Gaussian term
  (mu_hat_l, sigma_hat_l) = head_l(d_l); then, sampling top-down, q(z_L | x) = N(mu_hat_L, sigma_hat_L^2) and
  for l < L the bottom-up term is combined with the generative model's own p(z_l | z_{l+1}) = N(mu_p, sigma_p^2)
  by precision weighting::

      sigma_q^2 = 1 / (sigma_hat^-2 + sigma_p^-2),    mu_q = (mu_hat sigma_hat^-2 + mu_p sigma_p^-2) sigma_q^2.

  The guide therefore shares the decoder's between-layer networks (and registers them under the same name).

**Objectives.** Every objective of :mod:`pyro_vae.objectives` runs on it through traces, and ``fit(...,
compile=True)`` captures it. DReG and STL keep their properties (unbiased; zero at the exact posterior): their
log q_sg replays the guide against the latent values with detached parameters, so q(z_2 | z_1)'s dependence on
z_1 stays in the path derivative (:func:`~pyro_vae.particles.stop_gradient_log_q`). The closed-form KL of :class:`~pyro_vae.objectives.AnalyticKLELBO` is evaluated
per site at the sampled parents, KL(q(z_l | parents) || p(z_l | z_{l+1})); that is an unbiased estimate of the
site's term of the ELBO only when the guide samples the model's parents z_{l+1} *before* z_l (true top-down, so
the ladder VAE gets the closed form for every layer). Bottom-up, z_{l+1} is drawn *given* z_l: the closed
form at the sampled z_{l+1} would ignore their correlation under q and bias the bound (by several nats for
the exact posterior of a linear-Gaussian hierarchy, tests/test_structured.py), so the bottom-up guide's sites z_1 .. z_{L-1} are :class:`BottomUpNormal`, for which the analytic objective
takes the Monte Carlo KL log q - log p (only the top layer against N(0, I) keeps its closed form).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Independent, register_kl

import pyro
import pyro.distributions as dist

from .data import as_batch
from .guides import DiagonalNormal
from .likelihoods import make_likelihood
from .networks import mlp
from .priors import make_prior
from .vae import model_modules

__all__ = ["HierarchicalVAE", "BottomUpNormal", "INFERENCE"]

INFERENCE = ("bottom-up", "top-down")


class BottomUpNormal(dist.Independent):
    """A diagonal Gaussian guide site q(z_l | z_{l-1}) sampled *before* its model parents z_{l+1}: no
    closed-form KL against p(z_l | z_{l+1}) is an unbiased ELBO term, so none is registered (Monte Carlo)."""

    kl_monte_carlo_reason = ("the bottom-up guide samples this layer before its model parents: the closed-form "
                             "KL at the sampled parents would bias the bound")


@register_kl(BottomUpNormal, Independent)
def _no_closed_form(q, p):
    raise NotImplementedError("bottom-up hierarchical site: the closed-form KL at the sampled parents is biased")


class HierarchicalVAE(nn.Module):
    """L Gaussian stochastic layers with MLPs between them: decoder = Pyro model, encoder = Pyro guide.

    Args:
        input_shape: shape of one data point.
        hidden_layers: the latent sizes (d_1, ..., d_L), z_1 next to x.
        inference: ``"bottom-up"`` (Burda et al., 2016) or ``"top-down"`` (the ladder VAE, Sønderby et al., 2016).
        activation: of the deterministic layers.
        likelihood: p(x|z_1): a name of :mod:`pyro_vae.likelihoods` or a Likelihood.
        prior: p(z_L): ``"standard"``, ``"mog"``, ``"vamp"``, ``"flow"`` or a :class:`~pyro_vae.priors.Prior`.
        prior_components: K of the ``"mog"``/``"vamp"`` prior.
        deterministic: per layer l, the deterministic hidden sizes between z_{l-1} (z_0 = x) and z_l, used by the
            encoder and, mirrored, by the decoder; default (2 d_l, 2 d_l): latent sizes (100, 50) with tanh are
            Burda et al.'s two-layer architecture (x-200-200-z_1-100-100-z_2, the decoder its mirror). Empty
            tuples make every network linear.
        sigma: for the Gaussian likelihood.
        prior_kwargs: passed to the prior (e.g. ``flow_steps=``).

    The VampPrior's components are q(z_L | u_k): exact top-down (q(z_L|x) is a function of x); bottom-up
    along the mean path u -> E[z_1] -> ... -> q(z_L | E[z_{L-1}]).

    The defaults (``hidden_layers=(100, 50)``, ``activation="tanh"``, ``deterministic=None``, bottom-up) are
    exactly Burda et al.'s two-layer architecture: q(z_1|x) x-200-200-z_1, q(z_2|z_1) z_1-100-100-z_2, and
    the decoder its mirror, p(z_1|z_2) z_2-100-100-z_1, p(x|z_1) z_1-200-200-x. On the command line:
    ``pyro-vae train --hierarchy 100,50 --activation tanh`` (docs/cli.md).
    """

    def __init__(self, input_shape=(1, 28, 28), hidden_layers=(100, 50), inference: str = "bottom-up",
                 activation: str = "tanh", likelihood="bernoulli", prior="standard",
                 prior_components: int | None = None, deterministic=None, sigma=None,
                 prior_kwargs: dict | None = None):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        sizes = tuple(hidden_layers)
        if not sizes or any(isinstance(d, bool) or int(d) != d or int(d) < 1 for d in sizes):
            raise ValueError(f"hidden_layers must be a non-empty tuple of positive latent sizes, got {hidden_layers!r}")
        if inference not in INFERENCE:
            raise ValueError(f"unknown inference {inference!r}; choose 'bottom-up' or 'top-down'")
        self.latent_sizes = tuple(int(d) for d in sizes)
        self.inference = inference
        self.deterministic = (tuple((2 * d, 2 * d) for d in self.latent_sizes) if deterministic is None
                              else tuple(tuple(int(s) for s in h) for h in deterministic))
        if len(self.deterministic) != self.num_layers:
            raise ValueError(f"deterministic needs one tuple of hidden sizes per layer ({self.num_layers}), got "
                             f"{len(self.deterministic)}")
        self.likelihood = make_likelihood(likelihood, self.input_shape, sigma=sigma)
        self.families = nn.ModuleList(DiagonalNormal(d) for d in self.latent_sizes)
        self.encoder = self._make_encoder(activation)
        self.decoder = self._make_decoder(activation)
        top = self.latent_sizes[-1]
        self.register_buffer("prior_loc", torch.zeros(top), persistent=False)
        self.register_buffer("prior_scale", torch.ones(top), persistent=False)
        learned = make_prior(prior, top, prior_components, encode=self._pseudo_posterior,
                             input_shape=self.input_shape, **(prior_kwargs or {}))
        #: the learned prior of the top layer, or None for N(0, I)
        self.learned_prior = None if learned.standard else learned

    @property
    def num_layers(self) -> int:
        return len(self.latent_sizes)

    def _make_encoder(self, activation: str) -> nn.ModuleDict:
        """Per layer: a trunk (deterministic layers, activation after each) and a head (Gaussian features).
        Bottom-up, trunk l reads z_{l-1}; top-down it reads d_{l-1}, the previous trunk's output."""
        trunks, heads, width = [], [], math.prod(self.input_shape)
        for l, (d, hidden) in enumerate(zip(self.latent_sizes, self.deterministic)):
            trunks.append(mlp([width, *hidden], activation, final_activation=True))
            heads.append(nn.Linear(hidden[-1] if hidden else width, self.families[l].num_params))
            width = d if self.inference == "bottom-up" else (hidden[-1] if hidden else width)
        return nn.ModuleDict({"trunks": nn.ModuleList(trunks), "heads": nn.ModuleList(heads)})

    def _make_decoder(self, activation: str) -> nn.ModuleList:
        """decoder[0]: z_1 -> p(x|z_1)'s parameters; decoder[l] (l >= 1): z_{l+1} -> p(z_l | z_{l+1})'s."""
        out = self.likelihood.num_params * math.prod(self.input_shape)
        nets = [mlp([self.latent_sizes[0], *reversed(self.deterministic[0]), out], activation)]
        for l in range(1, self.num_layers):
            nets.append(mlp([self.latent_sizes[l], *reversed(self.deterministic[l]),
                             self.families[l - 1].num_params], activation))
        return nn.ModuleList(nets)

    # ----------------------------------------------------------------- building blocks
    @property
    def dtype(self) -> torch.dtype:
        return self.prior_loc.dtype

    def _data(self, x) -> torch.Tensor:
        x = as_batch(x, self.input_shape)
        return x if x.dtype == self.dtype else x.to(self.dtype)

    def prior(self) -> dist.TorchDistribution:
        """p(z_L): N(0, I) or the learned prior, event_shape (d_L,)."""
        if self.learned_prior is not None:
            return self.learned_prior()
        return dist.Normal(self.prior_loc, self.prior_scale).to_event(1)

    def conditional_prior(self, l: int, z_above: torch.Tensor) -> dist.TorchDistribution:
        """p(z_l | z_{l+1}) for 1 <= l < L: N(mu_p, diag sigma_p^2) from decoder[l]."""
        return self.families[l - 1](self.decoder[l](z_above))

    def decode(self, z1: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z_1) for z_1 of shape (..., d_1)."""
        return self.likelihood(self._decode_params(z1))

    def _decode_params(self, z1: torch.Tensor) -> torch.Tensor:
        out = self.decoder[0](z1)
        return out.reshape(*z1.shape[:-1], self.likelihood.num_params, *self.input_shape)

    def _features(self, x: torch.Tensor) -> list:
        """Top-down only: the deterministic bottom-up pass d_1 .. d_L."""
        h, out = x.flatten(1), []
        for trunk in self.encoder["trunks"]:
            h = trunk(h)
            out.append(h)
        return out

    def _ladder_step(self, l: int, d: torch.Tensor, z_above: torch.Tensor) -> dist.TorchDistribution:
        """q(z_l | z_{l+1}, x): the bottom-up term N(mu_hat, sigma_hat^2) = head_l(d_l) and the model's
        p(z_l | z_{l+1}) = N(mu_p, sigma_p^2) combined by precision weighting."""
        family = self.families[l - 1]
        loc_hat, raw = self.encoder["heads"][l - 1](d).split(family.z_dim, dim=-1)
        p = self.conditional_prior(l, z_above).base_dist
        prec_hat, prec_p = family.positive(raw).pow(-2), p.scale.pow(-2)
        var = 1.0 / (prec_hat + prec_p)
        return dist.Normal((loc_hat * prec_hat + p.loc * prec_p) * var, var.sqrt()).to_event(1)

    def _infer(self, x: torch.Tensor, draw) -> None:
        """Run q(z|x) layer by layer; ``draw(name, q)`` gives each site's value (a sample, or q's mean)."""
        trunks, heads, L = self.encoder["trunks"], self.encoder["heads"], self.num_layers
        if self.inference == "bottom-up":
            h = x.flatten(1)
            for l in range(1, L + 1):
                q = self.families[l - 1](heads[l - 1](trunks[l - 1](h)))
                h = draw(f"z{l}", q if l == L else BottomUpNormal(q.base_dist, 1))
            return
        d = self._features(x)
        z = draw(f"z{L}", self.families[L - 1](heads[L - 1](d[L - 1])))
        for l in range(L - 1, 0, -1):
            z = draw(f"z{l}", self._ladder_step(l, d[l - 1], z))

    def _descend(self, z: torch.Tensor, draw) -> torch.Tensor:
        """z_L -> z_1 through p(z_l | z_{l+1}); ``draw(name, p)`` gives each value."""
        for l in range(self.num_layers - 1, 0, -1):
            z = draw(f"z{l}", self.conditional_prior(l, z))
        return z

    def _pseudo_posterior(self, u: torch.Tensor) -> dist.TorchDistribution:
        """q(z_L | u) for the VampPrior's pseudo-inputs u (K, *input_shape): batch_shape (K,)."""
        trunks, heads, L = self.encoder["trunks"], self.encoder["heads"], self.num_layers
        if self.inference == "top-down":
            return self.families[L - 1](heads[L - 1](self._features(u)[L - 1]))
        h = u.flatten(1)
        for l in range(L - 1):  # the mean path to the top layer
            h = self.families[l].mean(heads[l](trunks[l](h)))
        return self.families[L - 1](heads[L - 1](trunks[L - 1](h)))

    def _model_modules(self) -> dict:
        return model_modules(self)

    def _guide_modules(self) -> dict:
        if self.inference == "top-down":  # the ladder shares the model's p(z_l | z_{l+1})
            return {"encoder": self.encoder, "decoder": self.decoder}
        return {"encoder": self.encoder}

    # ----------------------------------------------------------------- the two Pyro programs
    def model(self, x=None, batch_size: int | None = None):
        """p(z_L) prod p(z_l | z_{l+1}) p(x | z_1) in the plate ``"data"``; generates ``batch_size`` points when
        ``x`` is None."""
        for name, module in self._model_modules().items():
            pyro.module(name, module)
        x = None if x is None else self._data(x)
        if x is None and batch_size is None:
            raise ValueError("model(x=None) needs batch_size= to know how many data points to generate")
        with pyro.plate("data", x.shape[0] if x is not None else int(batch_size)):
            z = pyro.sample(f"z{self.num_layers}", self.prior())
            z1 = self._descend(z, pyro.sample)
            return pyro.sample("x", self.decode(z1), obs=x)

    def guide(self, x, batch_size: int | None = None):
        """q(z|x), bottom-up or top-down (the ladder), each ``"zl"`` sampled inside the plate ``"data"``."""
        for name, module in self._guide_modules().items():
            pyro.module(name, module)
        x = self._data(x)
        with pyro.plate("data", x.shape[0]):
            self._infer(x, pyro.sample)

    # ----------------------------------------------------------------- helpers
    @torch.no_grad()
    def init_output_bias(self, mean=None) -> None:
        """Start p(x|z_1)'s output bias where E[x|z] is the mean image ``mean`` (the logit of the mean pixel for a
        Bernoulli likelihood; Burda et al., 2016), or at 0 when ``mean`` is None."""
        shape = (self.likelihood.num_params, *self.input_shape)
        bias = torch.zeros(shape) if mean is None else self.likelihood.output_for_mean(self._data(mean[None])[0])
        self.decoder[0][-1].bias.copy_(bias.reshape(-1))

    @torch.no_grad()
    def posterior_means(self, x) -> dict:
        """{"z1": ..., "zL": ...}: each layer at q's mean given the means of the layers sampled before it."""
        means = {}

        def mean(name, q):
            means[name] = q.mean
            return q.mean

        self._infer(self._data(x), mean)
        return means

    @torch.no_grad()
    def reconstruct(self, x, sample_z: bool = False) -> torch.Tensor:
        """E[x | z_1] at z_1 = its posterior mean given the means of the layers sampled before it (or a posterior
        sample of every layer with ``sample_z=True``)."""
        values = {}

        def draw(name, q):
            values[name] = q.sample() if sample_z else q.mean
            return values[name]

        self._infer(self._data(x), draw)
        return self.likelihood.mean(self._decode_params(values["z1"]))

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> torch.Tensor:
        """n draws z_L ~ p(z_L), z_l ~ p(z_l | z_{l+1}), returned as E[x|z_1] (``mean=True``) or x ~ p(x|z_1)."""
        z = self.prior().expand([int(n)]).sample()
        out = self._decode_params(self._descend(z, lambda name, p: p.sample()))
        return self.likelihood.mean(out) if mean else self.likelihood(out).sample()
