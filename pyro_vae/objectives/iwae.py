r"""The importance-weighted bound (IWAE) with three gradient estimators: iwae, dreg and stl.

For one data point x, K particles z_k ~ q(z|x) and log weights log w_k = log p(x, z_k) - log q(z_k|x),

    IWAE_K(x) = E[ log (1/K) sum_k w_k ] <= log p(x)

(Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016). IWAE_1 is the ELBO and
IWAE_K increases monotonically with K towards log p(x). Normalized weights: w~_k = w_k / sum_j w_j.

Gradient estimators (z_k = z(eps_k; phi) reparameterized, theta = model, phi = guide parameters):

* ``"iwae"`` (Burda et al. 2016): the total derivative of log (1/K) sum_k w_k,
  sum_k w~_k d/d(theta, phi) log w_k.
* ``"stl"`` (sticking the landing; Roeder, Wu & Duvenaud, NeurIPS 2017): the same with q's distribution
  parameters stop-gradiented inside log q, i.e. the score term sum_k w~_k d log q_phi(z_k)/d phi is dropped.
  Zero variance at q = p(z|x). Unbiased for K = 1 (where E[score] = 0), but *biased* for K > 1 (the dropped
  term sum_k w~_k d log q/d phi does not have mean zero; Tucker et al. 2018, sec. 3).
* ``"dreg"`` (doubly reparameterized; Tucker, Lawson, Gu & Maddison, ICLR 2019):
  guide:  sum_k w~_k^2 (d log w_k / d z_k) (d z_k / d phi),  with q's parameters stop-gradiented in log w_k;
  model:  sum_k w~_k d log p_theta(x, z_k) / d theta  (unchanged).
  Unbiased for the IWAE gradient, zero variance at q = p(z|x), and its guide signal-to-noise ratio grows with
  K instead of decaying like 1/sqrt(K) (Rainforth et al., "Tighter variational bounds are not necessarily
  better", ICML 2018).
"""
from __future__ import annotations

import math

import torch

from pyro.infer import ELBO
from pyro.util import warn_if_nan

from ._weights import (CellLayout, TracedParticles, check_reparameterized, detach_distribution, latent_sites,
                       log_density, sample_sites, trace_particles)

__all__ = ["IWAEELBO", "ESTIMATORS"]

ESTIMATORS = ("iwae", "dreg", "stl")


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/K) sum_k exp(log_w_k) along ``dim``, computed stably."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


class IWAEELBO(TracedParticles, ELBO):
    r"""The IWAE bound, one bound per data point, with the ``iwae``, ``dreg`` or ``stl`` gradient estimator.

    The K particles are drawn in one vectorized pass (particle plate at dim ``-(max_plate_nesting + 1)``).
    Log weights are summed over sites per *cell*, where the cells are the plates enclosing every sample site
    (for a VAE: the data points of the batch plate), and the log-mean-exp over particles is taken per cell::

        loss = -scale * sum_n [ logsumexp_k log w_{k,n} - log K ]

    with ``scale`` the batch plate's subsampling factor (N/B for ``subsample_size=B`` out of N), i.e. a batch
    of B points gives B bounds. A model with a global latent outside the batch plate has a single cell (the
    whole batch), which is then the bound :class:`~pyro.infer.RenyiELBO` with ``alpha=0`` computes.

    ``loss`` returns the bound's value (never a surrogate); ``differentiable_loss`` returns a tensor whose
    *value* is also the negative bound for every estimator, and whose *gradient* is the chosen estimator:

    * iwae: ``-scale * sum_n log_mean_exp_k(log w)`` itself;
    * stl:  ``-(bound.detach() + S - S.detach())`` with S = scale * sum_n log_mean_exp_k(log w^stl), where
      log w^stl = log p(x, z) - log q_{stop(phi)}(z); only the q-parameter gradient differs from iwae;
    * dreg: ``-(bound.detach() + S - S.detach())`` with S = scale * sum_n sum_k stop(w~_k) log w^stl_k and a
      gradient hook on z_k (as consumed by the model and by log q) that multiplies its gradient by stop(w~_k):
      the model parameters receive sum_k w~_k d log p / d theta (the hook does not touch them), the guide
      parameters sum_k w~_k^2 (d log w^stl_k / d z_k) (d z_k / d phi). One model pass, no second surrogate.

    "q_{stop(phi)}" is each guide site's distribution rebuilt with detached parameters
    (:func:`~pyro_vae.objectives._weights.detach_distribution`); supported are distributions whose parameters
    are tensors (Normal, MultivariateNormal, LowRankMultivariateNormal, Laplace, StudentT, affine/exp
    TransformedDistributions, ...), not neural flows. The stop-gradient cuts each site's parameters as a
    whole, so dreg/stl are exact for guides whose sites' parameters do not depend on other latent sites
    (every VAE encoder q(z|x)); for hierarchical guides they also drop the path through parent latents.

    All guide latent sites must be reparameterizable (``has_rsample``).

    :param int num_particles: K.
    :param str estimator: ``"iwae"``, ``"dreg"`` or ``"stl"``.
    :param max_plate_nesting: the model's plate nesting, *not* counting the particle plate; guessed when inf.
    :param kwargs: passed on to :class:`pyro.infer.ELBO` (e.g. ``retain_graph``).
    """

    def __init__(self, num_particles: int = 1, estimator: str = "iwae", max_plate_nesting=float("inf"), **kwargs):
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown IWAE gradient estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        if not kwargs.pop("vectorize_particles", True):
            raise ValueError("IWAEELBO always vectorizes its particles (the log-mean-exp needs all K at once)")
        super().__init__(num_particles=int(num_particles), max_plate_nesting=max_plate_nesting,
                         vectorize_particles=True, **kwargs)
        self.max_plate_nesting = max_plate_nesting  # the model's own nesting (ELBO.__init__ added 1)
        self.estimator = estimator


    # ------------------------------------------------------------------------------------------ pieces
    @staticmethod
    def _stopped_guide_log_density(layout: CellLayout, guide_trace, aliases: dict) -> torch.Tensor:
        """sum_s log q_s(z_s) with q_s's parameters detached, evaluated at the aliases of z_s (K, *cells)."""
        log_probs = {}
        for name, site in sample_sites(guide_trace).items():
            value = aliases.get(name, site["value"])
            log_probs[name] = detach_distribution(site["fn"]).log_prob(value)
        return log_density(layout, sample_sites(guide_trace), log_probs)

    @staticmethod
    def _scale_latent_gradients(layout: CellLayout, guide_trace, aliases: dict, weights: torch.Tensor) -> None:
        """Hook: the gradient reaching alias z_k is multiplied by w~_k (per particle and cell)."""
        for name, site in latent_sites(guide_trace).items():
            alias = aliases[name]
            if alias.requires_grad:
                factor = layout.broadcast_to_value(weights, site["fn"].event_dim)
                alias.register_hook(lambda grad, factor=factor: grad * factor)

    def bound_and_surrogate(self, model, guide, args, kwargs, for_gradients: bool = True):
        """(bound, surrogate): the scaled, summed IWAE bound and the tensor whose gradient is the estimator."""
        nesting = self._plate_nesting(model, guide, args, kwargs)
        stop_q = for_gradients and self.estimator != "iwae"
        model_trace, guide_trace, aliases = trace_particles(model, guide, args, kwargs, self.num_particles, nesting,
                                                            alias=stop_q)
        if for_gradients:
            check_reparameterized(guide_trace, f"{type(self).__name__}(estimator={self.estimator!r})")
        layout = CellLayout.from_traces(model_trace, guide_trace, self.num_particles, nesting)
        log_p = log_density(layout, sample_sites(model_trace))
        log_w = log_p - log_density(layout, sample_sites(guide_trace))
        bound = layout.scale * log_mean_exp(log_w).sum()
        if not stop_q:
            return bound, bound
        log_w_stl = log_p - self._stopped_guide_log_density(layout, guide_trace, aliases)
        if self.estimator == "stl":
            surrogate = layout.scale * log_mean_exp(log_w_stl).sum()
            return bound, bound.detach() + (surrogate - surrogate.detach())
        weights = torch.softmax(log_w_stl.detach(), dim=0)  # w~_k per cell
        self._scale_latent_gradients(layout, guide_trace, aliases, weights)
        surrogate = layout.scale * (weights * log_w_stl).sum()
        return bound, bound.detach() + (surrogate - surrogate.detach())

    # ------------------------------------------------------------------------------------------ API
    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """A tensor equal to -IWAE_K (summed over cells) whose gradient is the chosen estimator."""
        bound, surrogate = self.bound_and_surrogate(model, guide, args, kwargs, for_gradients=True)
        loss = -surrogate
        warn_if_nan(loss, "loss")
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        """-IWAE_K (summed over cells, scaled) as a float."""
        with torch.no_grad():
            bound, _ = self.bound_and_surrogate(model, guide, args, kwargs, for_gradients=False)
        return -float(bound)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """-IWAE_K as a float, after backpropagating the estimator into the parameters."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return float(loss.detach())
