"""The VAE as two Pyro programs over one latent site ``"z"``, and their trace-free particle twin.

* **model** p(z) p_theta(x|z): z ~ N(0, I) (``.to_event(1)``) or a learned prior (``prior="mog"``,
  ``"vamp"``, ``"flow"``: :mod:`pyro_vae.priors`), the decoder turns z into the parameters of the likelihood,
  and ``"x"`` is observed under it.
* **guide** q_phi(z|x): the encoder turns x into the parameters of a posterior family and ``"z"`` is sampled
  from it with the reparameterization z = mu + sigma * eps (Kingma & Welling, 2014).
* **particles** (the twin): the per-(particle, data point) terms log p(x|z), log p(z), log q(z|x) of
  :class:`~pyro_vae.particles.Particles` computed directly, with the noise drawn exactly as Pyro's vectorized
  particle plate draws it, so every objective gives the same value and gradients as on the traced
  model/guide, without Pyro's per-step tracing. Change ``model``/``guide`` and this method together.

Training maximizes ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)) with any Pyro objective, e.g.
``pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())``.

Test-time inference: :meth:`VAE.refine` improves the encoder's q(z|x) for fixed x by SVI on per-point
variational parameters (a :class:`~pyro_vae.guides.LocalPosterior`), with the decoder frozen; its ``guide``
evaluates like ``vae.guide`` (the inference-gap analysis of :mod:`pyro_vae.analysis` is built on it).

Every method takes ``(x, c=None)``: a plain VAE ignores the condition c, and
:class:`~pyro_vae.conditional.ConditionalVAE` overrides only the building blocks that use it (``condition``,
the networks' inputs and the prior), so model, guide and twin are written once.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

import pyro
import pyro.distributions as dist

from .data import as_batch
from .guides import POSTERIORS, LocalPosterior, make_posterior, marginal_moments
from .likelihoods import make_likelihood
from .networks import make_networks
from .particles import NotReparameterizedError, Particles, closed_form_kl, detach_distribution, register_modules
from .priors import kl_monte_carlo_reason, make_prior

__all__ = ["VAE", "as_batch"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def model_modules(vae) -> dict:
    """The modules of a VAE's model p(x, z) that it registers with ``pyro.module``: the decoder, the likelihood when
    it has learned parameters, a learned prior, and for the VampPrior (p(z) = mean_k q(z | u_k) runs the encoder)
    the guide's modules too. ``vae``: a :class:`VAE` or :class:`~pyro_vae.hierarchical.HierarchicalVAE`."""
    modules = {"decoder": vae.decoder}
    if any(p.requires_grad for p in vae.likelihood.parameters()):
        modules["likelihood"] = vae.likelihood
    if vae.learned_prior is not None:
        modules["prior"] = vae.learned_prior
        if getattr(vae.learned_prior, "encode", None) == vae._pseudo_posterior:
            modules.update(vae._guide_modules())
    return modules


class VAE(nn.Module):
    """A variational autoencoder: decoder = Pyro model, encoder = Pyro guide.

    Args:
        input_shape: shape of one data point, e.g. ``(1, 28, 28)``.
        z_dim: latent dimension d; the prior is p(z) = N(0, I_d).
        likelihood: ``"bernoulli"``, ``"gaussian"``, ``"continuous-bernoulli"``, ``"laplace"`` or a
            :class:`~pyro_vae.likelihoods.Likelihood`.
        guide: posterior family name (``"diagonal"``, ...) or a
            :class:`~pyro_vae.guides.PosteriorFamily`.
        hidden: hidden layer sizes of the encoder (the decoder mirrors them).
        activation: ``"relu"``, ``"tanh"``, ...
        network: ``"mlp"`` or ``"conv"``.
        encoder: your own ``nn.Module`` mapping (B, *input_shape) to (B, posterior.num_params).
        decoder: your own ``nn.Module`` mapping (B, z_dim) to (B, likelihood.num_params, *input_shape)
            (or anything with that many elements per row).
        sigma: for the Gaussian likelihood: ``"decoder"``, ``"learned"`` or a fixed float.
        guide_kwargs: passed to the posterior family (e.g. ``rank=``, ``flow_steps=``).
        prior: ``"standard"`` (N(0, I)), ``"mog"`` (K learned Gaussians), ``"vamp"`` (the VampPrior, a mixture of
            this encoder's posteriors at K learned pseudo-inputs), ``"flow"`` (a learned flow of N(0, I)) or a
            :class:`~pyro_vae.priors.Prior` (see :mod:`pyro_vae.priors`). A learned prior has no closed-form
            KL: the analytic objective uses log q(z|x) - log p(z) for it.
        prior_components: K for ``"mog"`` (default 10) and ``"vamp"`` (default 500).
        prior_kwargs: passed to the prior (e.g. ``flow_steps=`` for ``"flow"``).
    """

    def __init__(self, input_shape=(1, 28, 28), z_dim: int = 20, likelihood="bernoulli", guide="diagonal",
                 hidden=(400,), activation="relu", network="mlp", encoder: nn.Module | None = None,
                 decoder: nn.Module | None = None, sigma=None, guide_kwargs: dict | None = None,
                 prior="standard", prior_components: int | None = None, prior_kwargs: dict | None = None):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        if not self.input_shape or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {input_shape!r}")
        self.z_dim = int(z_dim)
        self.likelihood = make_likelihood(likelihood, self.input_shape, sigma=sigma)
        self.posterior = make_posterior(guide, self.z_dim, **(guide_kwargs or {}))
        enc, dec = (None, None)
        if encoder is None or decoder is None:
            enc, dec = make_networks(network, self.input_shape, self.z_dim, self.posterior.num_params,
                                     self.likelihood.num_params, tuple(hidden), activation)
        self.encoder = encoder if encoder is not None else enc
        self.decoder = decoder if decoder is not None else dec
        self.register_buffer("prior_loc", torch.zeros(self.z_dim), persistent=False)
        self.register_buffer("prior_scale", torch.ones(self.z_dim), persistent=False)
        learned = make_prior(prior, self.z_dim, prior_components, encode=self._pseudo_posterior,
                             input_shape=self.input_shape, **(prior_kwargs or {}))
        #: the learned prior (:mod:`pyro_vae.priors`), or None for N(0, I) (closed forms)
        self.learned_prior = None if learned.standard else learned

    # ----------------------------------------------------------------- building blocks (overridden by subclasses)
    @property
    def dtype(self) -> torch.dtype:
        return self.prior_loc.dtype

    def condition(self, c):
        """The condition as the networks see it; a plain VAE has none (returns None, whatever c is)."""
        return None

    def label_condition(self, label: int, n: int):
        """The condition of ``n`` draws of class ``label``; a plain VAE has no classes."""
        raise ValueError("this VAE is not conditional: it takes no label (train a ConditionalVAE / --conditional)")

    def grid_conditions(self, per_class: int = 8):
        """Conditions for a figure of samples (one row per class for a label-conditional VAE); None here."""
        return None

    def likelihood_mask(self, c=None, mask=None):
        """Which pixels log p(x|z) covers: ``mask`` (all pixels when None)."""
        return mask

    def prior(self, cond=None) -> dist.TorchDistribution:
        """p(z) = N(0, I_d), or the learned prior's distribution."""
        if self.learned_prior is not None:
            return self.learned_prior()
        return dist.Normal(self.prior_loc, self.prior_scale).to_event(1)

    def prior_log_prob(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        """log p(z) = -|z|^2 / 2 - d/2 log(2 pi) (``self.prior(cond).log_prob(z)`` in closed form), or the
        learned prior's log density."""
        if self.learned_prior is not None:
            return self.learned_prior().log_prob(z)
        return -0.5 * z.square().sum(-1) - self.z_dim * _LOG_SQRT_2PI

    def _pseudo_posterior(self, u: torch.Tensor) -> dist.TorchDistribution:
        """q(z|u) for the VampPrior's pseudo-inputs u (K, *input_shape): batch_shape (K,)."""
        return self.posterior(self._encode_params(u))

    def _encode_params(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Encoder features for x of shape (..., *input_shape) -> (..., posterior.num_params)."""
        if x.dim() == len(self.input_shape) + 1:  # a plain batch: no reshapes (each is a node in the backward)
            return self.encoder(x)
        lead = x.shape[: x.dim() - len(self.input_shape)]
        out = self.encoder(x.reshape(-1, *self.input_shape))
        return out.reshape(*lead, self.posterior.num_params)

    def _decode_params(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        """Decoder output for z of shape (..., z_dim) -> (..., likelihood.num_params, *input_shape)."""
        if z.dim() == 2:  # a plain batch: no reshapes
            return self.decoder(z)
        lead = z.shape[:-1]
        out = self.decoder(z.reshape(-1, self.z_dim))
        return out.reshape(*lead, self.likelihood.num_params, *self.input_shape)

    def _model_modules(self) -> dict:
        """The modules of the model p(x, z) registered with ``pyro.module`` (:func:`model_modules`)."""
        return model_modules(self)

    def _guide_modules(self) -> dict:
        """The modules of the guide q(z|x) registered with ``pyro.module``."""
        modules = {"encoder": self.encoder}
        if any(p.requires_grad for p in self.posterior.parameters()):
            modules["posterior"] = self.posterior
        return modules

    def _pyro_modules(self) -> dict:
        """Every module that ``model`` and ``guide`` register with ``pyro.module``, by name."""
        return {**self._model_modules(), **self._guide_modules()}

    def _data(self, x) -> torch.Tensor:
        x = as_batch(x, self.input_shape)
        return x if x.dtype == self.dtype else x.to(self.dtype)

    @staticmethod
    def _batch_size(x, cond, batch_size) -> int:
        if x is not None:
            return x.shape[0]
        if cond is not None:
            return cond.shape[0]
        if batch_size is None:
            raise ValueError("model(x=None) needs batch_size= to know how many data points to generate")
        return int(batch_size)

    # ----------------------------------------------------------------- the two Pyro programs
    def model(self, x=None, c=None, *, batch_size: int | None = None, mask=None):
        """p(z) p(x|z): ``pyro.module`` for the decoder, a plate ``"data"`` over the batch, ``"z"`` then ``"x"``.

        With ``x=None`` it generates ``batch_size`` data points (e.g. under ``pyro.infer.Predictive``);
        ``mask`` (bool, broadcastable to x) restricts log p(x|z) to the selected pixels.
        """
        for name, module in self._model_modules().items():
            pyro.module(name, module)
        cond = self.condition(c)
        x = None if x is None else self._data(x)
        with pyro.plate("data", self._batch_size(x, cond, batch_size)):
            z = pyro.sample("z", self.prior(cond))
            out = self._decode_params(z, cond)
            return pyro.sample("x", self.likelihood(out, mask=self.likelihood_mask(c, mask)), obs=x)

    def guide(self, x, c=None, *, batch_size: int | None = None, mask=None):
        """q(z|x): the encoder's posterior family, ``"z"`` sampled inside the same batch plate."""
        for name, module in self._guide_modules().items():
            pyro.module(name, module)
        x, cond = self._data(x), self.condition(c)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.posterior(self._encode_params(x, cond)))

    # ----------------------------------------------------------------- the trace-free twin of model and guide
    def particles(self, x, c=None, *, mask=None, num_particles: int = 1, stop_q: bool = False,
                  kl: bool = False, log_weights: bool = True) -> Particles:
        """K = ``num_particles`` particles of ``(model, guide)`` without tracing (the same terms, noise and
        gradients as :func:`~pyro_vae.particles.trace_particles` on them):

            z_kn = rsample of q(z | x_n),  log p(x_n | z_kn),  log p(z_kn),  log q(z_kn | x_n),

        plus log q with stop-gradient parameters (``stop_q``) and the closed-form KL(q || p(z)) (``kl``;
        the Monte Carlo log q - log p where no closed form is registered). Shapes (K, N). With
        ``log_weights=False`` (a formula that reads only log p(x|z) and a closed-form KL) log p(z) and log q(z|x)
        are left out (None) unless the KL needs them. The modules reach Pyro's parameter store under the names
        ``model`` and ``guide`` give them (the one effect of ``pyro.module`` when no handler is active; under a
        handler the objectives trace ``model``/``guide`` instead of calling this).
        """
        register_modules(self._pyro_modules())
        x, cond = self._data(x), self.condition(c)
        params = self._encode_params(x, cond)
        # the draws of Pyro's particle plate, and the family's own closed-form KL against N(0, I) if asked
        standard = self.standard_prior(cond)
        z, log_qz, closed = self._draw(params, int(num_particles), kl and standard, log_weights)
        out = self._decode_params(z, cond)
        log_px = self.likelihood.log_prob(out, x, self.likelihood_mask(c, mask))
        prior = None if standard else self.prior(cond)  # (built once: a VampPrior runs the encoder)
        if kl and closed is None:
            closed = closed_form_kl(self.posterior(params), self.prior(cond) if prior is None else prior)
        if log_weights or (kl and closed is None):  # (the Monte Carlo KL reads them)
            log_qz = self.posterior(params).log_prob(z) if log_qz is None else log_qz
            p = Particles(log_px, self.prior_log_prob(z, cond) if prior is None else prior.log_prob(z), log_qz)
        else:
            p = Particles(log_px, None, None)
        if stop_q:
            q = self.posterior(params)
            p.log_qz_stop = detach_distribution(q).log_prob(z)
            p.gradient_scalers = [lambda w: _scale_gradient(z, w, q.event_dim)]
        if kl:
            p.kl = p.log_qz - p.log_pz if closed is None else closed.expand_as(log_px)
            if closed is None:  # Monte Carlo; by design where the prior or q says why (then no warning)
                p.kl_monte_carlo = ("z",)
                if kl_monte_carlo_reason(self.prior(cond) if prior is None else prior) or \
                        kl_monte_carlo_reason(self.posterior(params)):
                    p.kl_monte_carlo_expected = ("z",)
        return p

    def standard_prior(self, cond=None) -> bool:
        """Whether p(z|c) is N(0, I) (False for a learned prior: the twin then uses ``prior_log_prob`` and asks
        Pyro's KL registry, as the traced model does)."""
        return self.learned_prior is None

    def _draw(self, params, num_particles: int, kl: bool, log_q: bool = True):
        try:
            return self.posterior.draw(params, num_particles, kl, log_q)
        except NotImplementedError:  # no rsample
            raise NotReparameterizedError(f"the {type(self.posterior).__name__} posterior has no rsample") from None

    def particle_twin_of(self, model, guide) -> bool:
        """Whether :meth:`particles` mirrors this ``(model, guide)`` pair: the class's own, unmodified programs
        (a subclass that overrides ``model`` or ``guide`` is traced, unless it declares ``twin_mirrors``)."""
        return (getattr(model, "__func__", None), getattr(guide, "__func__", None),
                type(self).particles) == type(self).twin_mirrors

    # ----------------------------------------------------------------- test-time inference
    @torch.no_grad()
    def local_posterior(self, x, c=None, family=None, *, name: str = "local_posterior") -> LocalPosterior:
        """A :class:`~pyro_vae.guides.LocalPosterior` for the points x, initialised at the encoder's q(z|x).

        ``family``: None (or the encoder's own family, by name or instance) starts from the encoder's features
        and a copy of its family (an IAF keeps its trained flow); another family (a name of
        ``pyro_vae.guides.POSTERIORS``, ``"flow"`` for ``"iaf"``, or a :class:`~pyro_vae.guides.PosteriorFamily`,
        copied) starts from its member with q's means and marginal standard deviations and no correlation
        (``family.init_local``), e.g. a Cholesky or flow q equal to a diagonal encoder's q.
        """
        x, cond = self._data(x), self.condition(c)
        params = self._encode_params(x, cond)
        family = "iaf" if family == "flow" else family
        if family is None or family is self.posterior or (isinstance(family, str) and
                                                           POSTERIORS.get(family) is type(self.posterior)):
            return LocalPosterior(copy.deepcopy(self.posterior), params, self.input_shape, name)
        target = copy.deepcopy(make_posterior(family, self.z_dim)).to(device=x.device, dtype=self.dtype)
        if target.z_dim != self.z_dim:
            raise ValueError(f"the {type(target).__name__} family has z_dim {target.z_dim}, the VAE {self.z_dim}")
        loc, scale = marginal_moments(self.posterior(params))
        return LocalPosterior(target, target.init_local(loc, scale), self.input_shape, name)

    def refine(self, x, c=None, steps: int = 100, *, family=None, num_particles: int = 4, lr: float = 0.01,
               optim=None, loss=None, mask=None) -> LocalPosterior:
        r"""Semi-amortized inference (Kim et al., 2018; Marino et al., 2018): start from the encoder's q(z|x_n)
        and improve each point's variational parameters lambda_n by ``steps`` steps of Pyro SVI on

            sum_n ELBO(x_n; lambda_n) = sum_n E_q(z|lambda_n)[log p(x_n, z) - log q(z | lambda_n)],

        vectorized over the points (one (N, P) parameter tensor in the data plate) with the VAE frozen (its
        weights are not touched; their ``requires_grad`` is restored afterwards). Returns the
        :class:`~pyro_vae.guides.LocalPosterior` (its ``trace`` is the objective per step): evaluate it with
        ``pyro_vae.evaluation.elbo(vae.model, local.guide, x, batch_size=None)``, or use it as the proposal of
        ``log_likelihood``. ``family`` as in :meth:`local_posterior`; ``optim``/``loss`` as in
        :meth:`~pyro_vae.guides.LocalPosterior.fit` (defaults: ClippedAdam at ``lr`` decaying to lr/10,
        Trace_ELBO with ``num_particles`` vectorized particles).
        """
        local = self.local_posterior(x, c, family)
        if loss is None:  # the model's one plate ("data"), inside Pyro's particle plate
            loss = pyro.infer.Trace_ELBO(num_particles=int(num_particles), vectorize_particles=True,
                                         max_plate_nesting=1)
        frozen = [(p, p.requires_grad) for p in self.parameters()]
        training = self.training
        try:
            for p, _ in frozen:
                p.requires_grad_(False)
            self.eval()
            local.fit(self.model, self._data(x), c, steps=steps, num_particles=num_particles, lr=lr, optim=optim,
                      loss=loss, mask=mask)
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
            self.train(training)
        return local

    # ----------------------------------------------------------------- helpers
    @torch.no_grad()
    def init_output_bias(self, mean=None) -> None:
        """Start the decoder's output bias where E[x|z] is the mean image ``mean`` (the logit of the mean pixel
        for a Bernoulli likelihood; Burda et al., 2016), or at 0 when ``mean`` is None. The decoder needs a
        ``set_output_bias(bias)`` method (the bundled MLP and convolutional decoders have one)."""
        setter = getattr(self.decoder, "set_output_bias", None)
        if setter is None:
            raise ValueError(f"the decoder {type(self.decoder).__name__} has no set_output_bias(bias) method")
        shape = (self.likelihood.num_params, *self.input_shape)
        setter(torch.zeros(shape) if mean is None else self.likelihood.output_for_mean(self._data(mean[None])[0]))

    def encode(self, x, c=None) -> dist.TorchDistribution:
        """The posterior q(z|x) as a distribution with batch_shape (N,) and event_shape (z_dim,)."""
        return self.posterior(self._encode_params(self._data(x), self.condition(c)))

    def posterior_mean(self, x, c=None) -> torch.Tensor:
        """A point summary of q(z|x), shape (N, z_dim)."""
        return self.posterior.mean(self._encode_params(self._data(x), self.condition(c)))

    def decode(self, z: torch.Tensor, c=None) -> dist.TorchDistribution:
        """p(x|z) for z of shape (..., z_dim)."""
        return self.likelihood(self._decode_params(z, self.condition(c)))

    @torch.no_grad()
    def reconstruct(self, x, c=None, sample_z: bool = False) -> torch.Tensor:
        """E[x|z] at z = the posterior's point summary (or a posterior sample with ``sample_z=True``)."""
        x, cond = self._data(x), self.condition(c)
        params = self._encode_params(x, cond)
        z = self.posterior(params).sample() if sample_z else self.posterior.mean(params)
        return self.likelihood.mean(self._decode_params(z, cond))

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, c=None, label: int | None = None) -> torch.Tensor:
        """n draws z ~ p(z|c), returned as E[x|z] (``mean=True``) or as draws x ~ p(x|z).

        A conditional VAE needs the n conditions ``c`` or a class ``label``; a plain VAE ignores ``c``.
        """
        n = int(n)
        if label is not None:
            c = self.label_condition(label, n)
        cond = self.condition(c)
        if cond is not None and cond.shape[0] != n:
            raise ValueError(f"sampling {n} points needs {n} conditions, got {cond.shape[0]}")
        z = self.prior(cond).expand([n]).sample()
        out = self._decode_params(z, cond)
        return self.likelihood.mean(out) if mean else self.likelihood(out).sample()


def _scale_gradient(z: torch.Tensor, weights: torch.Tensor, event_dim: int) -> None:
    """Multiply the gradient reaching z (K, N, *event) by weights (K, N)."""
    if z.requires_grad:
        factor = weights.reshape(weights.shape + (1,) * event_dim)
        z.register_hook(lambda grad: grad * factor)


#: (model, guide, particles) functions: the programs the twin mirrors (see :meth:`VAE.particle_twin_of`)
VAE.twin_mirrors = (VAE.model, VAE.guide, VAE.particles)
