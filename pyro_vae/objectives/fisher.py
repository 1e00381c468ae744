r"""The Fisher auto-encoder objective (after Elkhalil, Hasan, Ding, Farsiu & Tarokh, "Fisher Auto-Encoders",
AISTATS 2021, PMLR 130:352-360).

For a data point x and z ~ q(z|x) drawn by reparameterization, this module implements

.. math::
   \mathcal L(x) = \underbrace{-\log p(x\mid z)}_{\text{reconstruction}}
     + \lambda\,\underbrace{\tfrac12\big\|\nabla_z\log q(z\mid x) - \nabla_z\log p(z)
                            - \nabla_z\log p(x\mid z)\big\|^2}_{\text{Fisher term}}
     + \gamma\,\underbrace{\tfrac12\big\|\nabla_z\log p(x\mid z)\big\|^2}_{\text{decoder-score penalty (optional)}}

averaged over particles and summed over the data (with Pyro's plate/subsample scale). Since
:math:`\nabla_z\log p(x, z) = \nabla_z\log p(z\mid x)` (the evidence p(x) does not depend on z), the Fisher
term's expectation under q is the Fisher divergence :math:`F(q(z|x)\,\|\,p(z|x))` between the encoder and the
exact posterior, computable without the normalizing constant p(x). It is zero iff q(z|x) = p(z|x) (for
positive, smooth densities on R^d).

What is from the paper and what is our choice is spelled out in ``docs/fisher.md``; in short, the
reconstruction term is written here as the log-likelihood (as in a VAE), the latent Fisher term is the
posterior-matching Fisher divergence, and the decoder-score penalty (weight ``decoder_score_weight``,
default 0) is a stability term of our own.

Scores are ``torch.autograd.grad(..., create_graph=True)`` of the batch-summed log densities with respect
to the sampled latent values: data points are independent, so the gradient of the sum w.r.t. z_i is point
i's score. No Python loop over data points.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import pyro.poutine as poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.poutine.util import site_is_subsample

__all__ = ["FisherELBO", "FisherObjective", "FisherTerms"]


@dataclass
class FisherTerms:
    """One particle's ingredients of the Fisher auto-encoder loss (all differentiable).

    Per latent site name: ``z`` (the sample), ``score_q`` = grad_z log q(z|x), ``score_prior`` =
    grad_z log p(z) (log density of the model's latent sites), ``score_likelihood`` = grad_z log p(x|z)
    (observed sites), each per data point (unscaled), and ``fisher_per_site`` = 1/2 ||score_q - score_prior -
    score_likelihood||^2 summed over event dims (batch-shaped). Totals (scaled sums over the data):
    ``reconstruction`` = -log p(x|z), ``fisher``, ``decoder_score_penalty``; ``loss`` combines them.
    """

    z: dict = field(default_factory=dict)
    score_q: dict = field(default_factory=dict)
    score_prior: dict = field(default_factory=dict)
    score_likelihood: dict = field(default_factory=dict)
    fisher_per_site: dict = field(default_factory=dict)
    reconstruction: torch.Tensor | float = 0.0
    fisher: torch.Tensor | float = 0.0
    decoder_score_penalty: torch.Tensor | float = 0.0
    loss: torch.Tensor | float = 0.0


def _site_log_prob(site) -> torch.Tensor:
    """Scaled and masked log density of a trace site, summed."""
    lp = site["fn"].log_prob(site["value"])
    return scale_and_mask(lp, site["scale"], site["mask"]).sum()


def _latent_sites(trace) -> dict:
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)}


def _observed_sites(trace) -> dict:
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site)}


def _broadcast_scale(scale, event_dim: int):
    """The site scale shaped to broadcast against a value with ``event_dim`` trailing event dims."""
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        return scale.reshape(scale.shape + (1,) * event_dim)
    return scale


def _unscale(score: torch.Tensor, scale, event_dim: int) -> torch.Tensor:
    """Undo the site's plate/subsample scale on its score: the per-data-point score.

    A local latent z_i in a plate scaled by s receives s * grad log p(x_i, z_i) from the scaled joint; a
    global latent (scale 1) keeps the scaled minibatch estimate of the full-data score.
    """
    s = _broadcast_scale(scale, event_dim)
    if isinstance(s, torch.Tensor):
        return torch.where(s > 0, score / s.clamp_min(torch.finfo(score.dtype).tiny), torch.zeros_like(score))
    return score / s if s else torch.zeros_like(score)


def _grads(total, zs):
    """grad of a scalar w.r.t. each z (zeros where unused), keeping the graph for the outer backward."""
    if not isinstance(total, torch.Tensor) or not total.requires_grad:
        return [torch.zeros_like(z) for z in zs]
    gs = torch.autograd.grad(total, zs, create_graph=True, allow_unused=True)
    return [torch.zeros_like(z) if g is None else g for z, g in zip(zs, gs)]


def _sample_latents(guide, args, kwargs):
    """Run the guide, then re-run it replayed on cloned latent values that autograd can differentiate.

    The clone keeps the reparameterized dependence on the guide parameters, breaks any transform cache
    (so log q is recomputed from the value) and the re-run makes downstream guide sites depend on it.
    """
    first = poutine.trace(guide).get_trace(*args, **kwargs)
    latents = _latent_sites(first)
    if not latents:
        raise ValueError("FisherELBO: the guide has no latent sample sites")
    for name, site in latents.items():
        if not getattr(site["fn"], "has_rsample", False):
            raise ValueError(f"FisherELBO needs reparameterized latents (rsample); guide site {name!r} with "
                             f"{type(site['fn']).__name__} has none")
        if not torch.is_floating_point(site["value"]):
            raise ValueError(f"FisherELBO needs continuous latents; guide site {name!r} is not")
        z = site["value"].clone()
        if not z.requires_grad:
            z.requires_grad_(True)
        site["value"] = z
    return poutine.trace(poutine.replay(guide, trace=first)).get_trace(*args, **kwargs)


def get_traces(model, guide, args, kwargs):
    """(model_trace, guide_trace) with differentiable latent values shared by both (one particle)."""
    guide_trace = _sample_latents(guide, args, kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def fisher_terms(model, guide, *args, fisher_weight: float = 1.0, decoder_score_weight: float = 0.0,
                 **kwargs) -> FisherTerms:
    """One-particle Fisher auto-encoder terms for a Pyro model/guide pair (see module docstring)."""
    model_trace, guide_trace = get_traces(model, guide, args, kwargs)
    q_sites = _latent_sites(guide_trace)
    p_latents = _latent_sites(model_trace)
    missing = [n for n in p_latents if n not in q_sites]
    if missing:
        raise ValueError(f"FisherELBO: model latent sites {missing} are not sampled by the guide")
    names = [n for n in q_sites if n in p_latents]
    if not names:
        raise ValueError("FisherELBO: no guide latent site is a latent site of the model")
    zs = [model_trace.nodes[n]["value"] for n in names]
    log_q = sum(_site_log_prob(s) for s in q_sites.values())
    log_prior = sum(_site_log_prob(s) for s in p_latents.values())
    log_lik = sum(_site_log_prob(s) for s in _observed_sites(model_trace).values())

    out = FisherTerms(reconstruction=-log_lik)
    fisher, penalty = 0.0, 0.0
    for name, z, gq, gp, gl in zip(names, zs, _grads(log_q, zs), _grads(log_prior, zs), _grads(log_lik, zs)):
        site = q_sites[name]
        event_dim = len(site["fn"].event_shape)
        gq, gp, gl = (_unscale(g, site["scale"], event_dim) for g in (gq, gp, gl))
        reduce = tuple(range(-event_dim, 0))

        def half_sq(v):
            v = 0.5 * v.pow(2)
            return v.sum(reduce) if reduce else v

        f_site = half_sq(gq - gp - gl)
        out.z[name], out.score_q[name], out.score_prior[name], out.score_likelihood[name] = z, gq, gp, gl
        out.fisher_per_site[name] = f_site
        fisher = fisher + scale_and_mask(f_site, site["scale"], site["mask"]).sum()
        if decoder_score_weight:
            penalty = penalty + scale_and_mask(half_sq(gl), site["scale"], site["mask"]).sum()
    out.fisher, out.decoder_score_penalty = fisher, penalty
    out.loss = out.reconstruction + fisher_weight * fisher + decoder_score_weight * penalty
    return out


class FisherELBO(ELBO):
    r"""Fisher auto-encoder objective as a Pyro ``ELBO`` (usable with ``pyro.infer.SVI``).

    Loss per data point, z ~ q(z|x) reparameterized (Elkhalil et al., AISTATS 2021; terms in the module
    docstring and ``docs/fisher.md``):

    .. math:: -\log p(x|z) + \lambda \tfrac12 \|\nabla_z \log q(z|x) - \nabla_z \log p(x, z)\|^2
              + \gamma \tfrac12 \|\nabla_z \log p(x|z)\|^2

    :param num_particles: Monte Carlo samples of z per data point (averaged, Python loop over particles).
    :param fisher_weight: lambda (> 0); 1 gives the unweighted Fisher divergence.
    :param decoder_score_weight: gamma (>= 0), optional stability penalty on the decoder's latent score.

    Not an evidence bound: ``loss`` is the objective value, not -ELBO. All guide latents must be continuous
    and reparameterizable, and every model latent must be sampled by the guide.
    """

    def __init__(self, num_particles: int = 1, fisher_weight: float = 1.0, decoder_score_weight: float = 0.0,
                 max_plate_nesting: float = float("inf")):
        if not fisher_weight > 0:
            raise ValueError(f"fisher_weight must be > 0, got {fisher_weight}")
        if decoder_score_weight < 0:
            raise ValueError(f"decoder_score_weight must be >= 0, got {decoder_score_weight}")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.fisher_weight = float(fisher_weight)
        self.decoder_score_weight = float(decoder_score_weight)

    def _get_trace(self, model, guide, args, kwargs):
        return get_traces(model, guide, args, kwargs)

    def terms(self, model, guide, *args, **kwargs) -> FisherTerms:
        """One particle's :class:`FisherTerms` (for diagnostics and tests)."""
        return fisher_terms(model, guide, *args, fisher_weight=self.fisher_weight,
                            decoder_score_weight=self.decoder_score_weight, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The loss averaged over ``num_particles``, differentiable w.r.t. model and guide parameters."""
        with torch.enable_grad():
            total = 0.0
            for _ in range(self.num_particles):
                total = total + self.terms(model, guide, *args, **kwargs).loss
            return total / self.num_particles

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The loss as a float (no parameter gradients are kept)."""
        value = float(self.differentiable_loss(model, guide, *args, **kwargs).detach())
        if not math.isfinite(value):
            import warnings
            warnings.warn(f"FisherELBO loss is {value}")
        return value

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Compute the loss and backpropagate it into the parameters' ``.grad``; returns the float loss."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())


FisherObjective = FisherELBO
