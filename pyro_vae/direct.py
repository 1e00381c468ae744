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

import torch

import pyro

__all__ = ["direct_loss_fn"]


def particles(objective) -> int | None:
    """K, when the objective draws its K particles in one vectorized pass (or K == 1); else None."""
    k = int(getattr(objective, "num_particles", 1))
    return k if k == 1 or getattr(objective, "vectorize_particles", False) else None


def latent(vae, x, c, k: int):
    """Encoder parameters, q(z|x), z (shape (K, N, d), or (N, d) for K == 1), decoder output and p(z)."""
    x = vae_batch(vae, x)
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
    return vae.likelihood(out, mask=mask).log_prob(x)


def vae_batch(vae, x):
    from .vae import as_batch

    return as_batch(x, vae.input_shape)


def _trace_elbo(objective, vae):
    """Trace_ELBO: -(1/K) sum_k sum_n log w_kn (every site reparameterized, so the loss is its own surrogate)."""
    k = particles(objective)
    if k is None:
        return None

    def loss(x, c=None):
        x, _, q, z, out, prior = latent(vae, x, c, k)
        log_w = log_likelihood(vae, out, x, c) + prior.log_prob(z) - q.log_prob(z)
        return -log_w.sum() / k

    return loss


def direct_loss_fn(objective, vae, model=None, guide=None):
    """A function ``(x[, c]) -> loss`` equal to ``objective.differentiable_loss(vae.model, vae.guide, x[, c])``,
    or None when the direct path does not apply (another objective, or a user's own model/guide)."""
    from .conditional import ConditionalVAE
    from .vae import VAE

    own = {(VAE.model, VAE.guide), (ConditionalVAE.model, ConditionalVAE.guide)}
    if not isinstance(vae, VAE) or (type(vae).model, type(vae).guide) not in own:
        return None
    for build in _BUILDERS.get(type(objective), ()):
        fn = build(objective, vae)
        if fn is not None:
            return fn
    return None


_BUILDERS = {pyro.infer.Trace_ELBO: (_trace_elbo,)}


def register(objective_type, builder) -> None:
    """Teach the direct path a new objective type: ``builder(objective, vae) -> loss function or None``."""
    _BUILDERS.setdefault(objective_type, ())
    _BUILDERS[objective_type] = (*_BUILDERS[objective_type], builder)
