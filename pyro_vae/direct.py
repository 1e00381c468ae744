"""A trace-free path for a VAE's own model and guide: the same objectives, without Pyro's per-step tracing.

Pyro computes an objective by running the guide and the model under ``poutine.trace`` and summing the sites'
log-densities. For :class:`~pyro_vae.vae.VAE` the trace always has the same shape (one plate, one latent site
``"z"``, one observed site ``"x"``), so the trainer can evaluate the identical formula directly:

    log w_kn = log p(x_n | z_kn) + log p(z_kn) - log q(z_kn | x_n),   z_kn = rsample of q(z | x_n)

with the noise drawn exactly as Pyro's vectorized particle plate draws it (one ``rsample`` of shape (K, N, d)),
so for the same RNG state the direct loss and gradients equal the traced ones (tested for every objective).
Objectives it does not know, and models or guides other than a VAE's own, go through Pyro as usual.
"""
from __future__ import annotations

import math

import torch

import pyro

from .vae import as_batch

__all__ = ["direct_loss_fn"]


def particles(objective) -> int | None:
    """K, when the objective draws its K particles in one vectorized pass (or K == 1); else None."""
    k = int(getattr(objective, "num_particles", 1))
    return k if k == 1 or getattr(objective, "vectorize_particles", False) else None


def latent(vae, x, c, k: int):
    """Encoder parameters, q(z|x), z (shape (K, N, d), or (N, d) for K == 1), decoder output and p(z)."""
    x = as_batch(x, vae.input_shape)
    cc = vae.condition(c) if c is not None else None
    params = vae._encode_params(x, cc) if cc is not None else vae._encode_params(x)
    q = vae.posterior(params)
    z = q.rsample((k,)) if k > 1 else q.rsample()
    out = vae._decode_params(z, cc) if cc is not None else vae._decode_params(z)
    prior = vae.prior(cc) if cc is not None else vae.prior()
    return x, params, q, z, out, prior


def log_likelihood(vae, out, x, c=None):
    """log p(x|z[,c]), restricted to the unobserved pixels for an image-completion conditional VAE."""
    mask = vae.missing_mask(c) if c is not None and getattr(vae, "missing_value", None) is not None else None
    return vae.likelihood.log_prob(out, x, mask)


def _trace_elbo(objective, vae):
    """Trace_ELBO: -(1/K) sum_k sum_n log w_kn (every site reparameterized, so the loss is its own surrogate)."""
    k = particles(objective)
    if k is None:
        return None

    def loss(x, c=None):
        return -log_weights(vae, x, c, num_particles=k).sum() / k

    return loss


def _kl(q, prior):
    """Closed-form KL(q || p(z)) per data point, or None when no closed form is registered."""
    from pyro.distributions.kl import kl_divergence

    try:
        return kl_divergence(q, prior)
    except NotImplementedError:
        return None


def _analytic_kl(objective, vae):
    """AnalyticKLELBO: -[(1/K) sum_k sum_n log p(x_n|z_kn) - beta sum_n KL(q(z|x_n) || p(z))]."""
    k = particles(objective)
    if k is None:
        return None

    def loss(x, c=None):
        x, _, q, z, out, prior = latent(vae, x, c, k)
        log_px = log_likelihood(vae, out, x, c).sum() / k
        kl = _kl(q, prior)
        if kl is None:  # no closed form: the Monte Carlo KL, as the traced objective falls back to
            kl = (q.log_prob(z) - prior.log_prob(z)).sum() / k
        else:
            kl = kl.sum()
        return -(log_px - objective.beta * kl)

    return loss


def _iwae(objective, vae):
    """IWAEELBO: the bound -sum_n [logsumexp_k log w_kn - log K], with the chosen gradient estimator.

    * ``iwae``: the gradient of the bound itself (Burda et al., 2015).
    * ``stl``: surrogate sum_k sg(w~_k) log w'_k, where log w' scores z under q with stop-gradiented
      parameters: only the path derivative through z reaches phi (Roeder et al., 2017).
    * ``dreg``: the same surrogate, with the gradient reaching z multiplied by sg(w~_k) by a hook, so phi gets
      sum_k w~_k^2 d log w'_k/dz_k dz_k/dphi while theta keeps sum_k w~_k grad log w_k (Tucker et al., 2018).

    The returned value is always the bound: surrogate - sg(surrogate) is added, which is zero.
    """
    k = particles(objective)
    estimator = getattr(objective, "estimator", "iwae")
    if k is None or estimator not in ("iwae", "stl", "dreg"):
        return None
    if estimator != "iwae" and any(p.requires_grad for p in vae.posterior.parameters()):
        return None  # the family has weights of its own (a flow): stop-gradients need the traced path
    log_k = math.log(k)

    def loss(x, c=None):
        x, params, q, z, out, prior = latent(vae, x, c, k)
        log_px_z = log_likelihood(vae, out, x, c) + prior.log_prob(z)
        if k == 1:
            log_px_z = log_px_z.unsqueeze(0)
        if estimator == "iwae":
            log_w = log_px_z - (q.log_prob(z) if k > 1 else q.log_prob(z).unsqueeze(0))
            return -(torch.logsumexp(log_w, 0) - log_k).sum()
        q_stop = vae.posterior(params.detach())
        log_q_stop = q_stop.log_prob(z) if k > 1 else q_stop.log_prob(z).unsqueeze(0)
        log_w = log_px_z - log_q_stop  # equal in value to log w; phi reaches it only through z
        bound = (torch.logsumexp(log_w, 0) - log_k).sum()
        w_tilde = torch.softmax(log_w.detach(), 0)
        if estimator == "dreg" and z.requires_grad:
            scale = w_tilde if k > 1 else w_tilde[0]
            z.register_hook(lambda g: g * scale.unsqueeze(-1))
        surrogate = (w_tilde * log_w).sum()
        return -(bound.detach() + surrogate - surrogate.detach())

    return loss


def own_vae(model, guide):
    """The VAE when ``model`` and ``guide`` are the bound ``model``/``guide`` of one of our VAEs, else None."""
    vae = getattr(model, "__self__", None)
    if vae is None or getattr(guide, "__self__", None) is not vae or not _is_own(vae):
        return None
    if getattr(model, "__func__", None) is not type(vae).model or getattr(guide, "__func__", None) is not type(vae).guide:
        return None
    return vae


def _is_own(vae) -> bool:
    from .conditional import ConditionalVAE
    from .vae import VAE

    own = {(VAE.model, VAE.guide), (ConditionalVAE.model, ConditionalVAE.guide)}
    return isinstance(vae, VAE) and (type(vae).model, type(vae).guide) in own


def log_weights(vae, x, c=None, *, num_particles: int) -> torch.Tensor:
    """log w_kn = log p(x_n, z_kn) - log q(z_kn | x_n) for K particles, shape (K, N) ((N,) when K == 1)."""
    x, _, q, z, out, prior = latent(vae, x, c, num_particles)
    return log_likelihood(vae, out, x, c) + prior.log_prob(z) - q.log_prob(z)


@torch.no_grad()
def particle_log_weights(vae, x, c=None, *, num_particles: int) -> torch.Tensor:
    """:func:`log_weights` without gradients, always of shape (K, N)."""
    log_w = log_weights(vae, x, c, num_particles=num_particles)
    return log_w if num_particles > 1 else log_w.unsqueeze(0)


def direct_loss_fn(objective, vae, model=None, guide=None):
    """A function ``(x[, c]) -> loss`` equal to ``objective.differentiable_loss(vae.model, vae.guide, x[, c])``,
    or None when the direct path does not apply (another objective, or a user's own model/guide)."""
    if not _is_own(vae):
        return None
    builders = _BUILDERS.get(type(objective), ())
    if not builders and type(objective).__name__ in _BY_NAME and type(objective).__module__.startswith("pyro_vae"):
        builders = (_BY_NAME[type(objective).__name__],)
    for build in builders:
        fn = build(objective, vae)
        if fn is not None:
            return fn
    return None


_BUILDERS = {pyro.infer.Trace_ELBO: (_trace_elbo,)}
_BY_NAME = {"AnalyticKLELBO": _analytic_kl, "IWAEELBO": _iwae}


def register(objective_type, builder) -> None:
    """Teach the direct path a new objective type: ``builder(objective, vae) -> loss function or None``."""
    _BUILDERS.setdefault(objective_type, ())
    _BUILDERS[objective_type] = (*_BUILDERS[objective_type], builder)
