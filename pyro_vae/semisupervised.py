r"""The semi-supervised M2 model (Kingma, Rezende, Mohamed & Welling, "Semi-Supervised Learning with Deep
Generative Models", NeurIPS 2014), as two Pyro programs.

* **model** p(x, y, z) = p(x|y,z) p(y) p(z): y ~ Categorical(1/C) over C classes, z ~ N(0, I), and the decoder
  turns (z, one-hot y) into the parameters of the likelihood of x. ``y`` is observed where the labels are given.
* **guide** q(y, z|x) = q(z|x,y) q(y|x): the classifier q(y|x) = Categorical(pi(x)) and the encoder's posterior
  family q(z|x,y) (any of :mod:`pyro_vae.guides`, e.g. ``"cholesky"``). Without labels, the guide's ``y`` site
  is marked ``infer={"enumerate": "parallel"}``: under :class:`pyro.infer.TraceEnum_ELBO` the C classes are
  summed out exactly, in one vectorized pass (a dimension of size C left of the data plate).

The bounds (Kingma et al., eqs. 6-9), per data point:

    labelled:    log p(x, y) >= L(x, y) = E_q(z|x,y)[log p(x|y,z) + log p(y) + log p(z) - log q(z|x,y)]
    unlabelled:  log p(x)    >= U(x)    = sum_y q(y|x) L(x, y) + H(q(y|x)),  H(q) = -sum_y q(y|x) log q(y|x)

and Kingma et al.'s auxiliary classification term alpha * log q(y|x) on labelled points (their eq. 9,
J^alpha = J + alpha * E[-log q(y|x)] as a loss), which lets the classifier learn from the labels directly (in
L(x, y) it does not appear). It is a ``pyro.factor("aux", aux_weight * log q(y|x))`` in the model's labelled
branch: a factor adds to log p, so every Pyro ELBO's loss on a labelled batch becomes
-sum_n [L(x_n, y_n) + aux_weight * log q(y_n|x_n)]. ``aux_weight`` is the weight per labelled point; Kingma et
al.'s alpha = 0.1 N on a sum over the N training points is aux_weight = 0.1 N / N_l for N_l labelled points
(:meth:`SemiSupervisedVAE.paper_aux_weight`). The default, 46 per labelled point (Pyro's ss-vae example's
multiplier), does not shrink with N_l: when labelled minibatches are drawn once per k unlabelled ones (pyro_vae.fit),
the auxiliary weight an epoch carries is aux_weight * N_u / k whatever N_l is, and on MNIST 0.1 N / N_l (1.8 at
3000 labels) left q(y|x) twice as wrong as 46 did (docs/benchmarks.md). With ``aux_weight=0`` the labelled loss
is the bound alone.

Training: ``pyro.infer.SVI(m2.model, m2.guide, optim, pyro.infer.TraceEnum_ELBO(max_plate_nesting=1))`` with
``svi.step(x, y)`` on labelled and ``svi.step(x)`` on unlabelled minibatches, or :func:`pyro_vae.fit` with
``objective=TraceEnum_ELBO(...)`` and ``labelled=(x_l, y_l)`` (docs/semi-supervised.md).

The networks and the conditioning on a one-hot label are :class:`~pyro_vae.conditional.ConditionalVAE`'s
(q(z|x,y) is its encoder with c = y, p(x|y,z) its decoder); this class adds the classifier, the ``y`` site
and the programs above.
"""
from __future__ import annotations

import math

import torch

import pyro
import pyro.distributions as dist

from .conditional import ConditionalVAE
from .networks import MLPEncoder

__all__ = ["SemiSupervisedVAE"]


class SemiSupervisedVAE(ConditionalVAE):
    """M2: ``model(x, y=None)`` and ``guide(x, y=None)``, labels observed where given and enumerated where not.

    Args:
        input_shape: shape of one data point x.
        num_classes: C, the number of classes of y.
        z_dim: latent dimension of z.
        likelihood: observation model p(x|y,z) (as for :class:`~pyro_vae.vae.VAE`).
        guide: posterior family of q(z|x,y): a name (diagonal, cholesky, lowrank, iaf, ...) or an instance.
        hidden: hidden sizes of the encoder and decoder MLPs.
        classifier_hidden: hidden sizes of the classifier q(y|x) (default: ``hidden``).
        activation: MLP activation.
        sigma: for the Gaussian likelihood.
        guide_kwargs: for the posterior family.
        aux_weight: alpha, the weight of log q(y|x) per labelled point (module docstring); >= 0; default
            ``DEFAULT_AUX_WEIGHT`` = 46.
    """

    #: the guide's y site: "parallel" (summed out exactly under TraceEnum_ELBO), "sequential", or None (sampled:
    #: Trace_ELBO / TraceGraph_ELBO then estimate its gradient by the score function)
    label_enumeration = "parallel"
    #: train with an enumerating objective (pyro.infer.TraceEnum_ELBO): fit refuses another one
    needs_enumeration = True
    #: the auxiliary weight per labelled point when none is given (module docstring)
    DEFAULT_AUX_WEIGHT = 46.0

    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10, z_dim: int = 50, likelihood="bernoulli",
                 guide="diagonal", hidden=(500,), classifier_hidden=None, activation="relu", sigma=None,
                 guide_kwargs: dict | None = None, aux_weight: float = DEFAULT_AUX_WEIGHT):
        if num_classes is None or int(num_classes) < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes!r}")
        if not (isinstance(aux_weight, (int, float)) and math.isfinite(aux_weight) and aux_weight >= 0):
            raise ValueError(f"aux_weight must be a finite number >= 0, got {aux_weight!r}")
        super().__init__(input_shape=input_shape, num_classes=int(num_classes), z_dim=z_dim, prior="standard",
                         likelihood=likelihood, guide=guide, hidden=hidden, activation=activation, sigma=sigma,
                         guide_kwargs=guide_kwargs)
        self.classifier = MLPEncoder(self.input_shape, self.num_classes,
                                     tuple(hidden if classifier_hidden is None else classifier_hidden), activation)
        self.aux_weight = float(aux_weight)
        self.register_buffer("class_logits", torch.zeros(self.num_classes), persistent=False)

    @staticmethod
    def paper_aux_weight(num_points: int, num_labelled: int) -> float:
        """Kingma et al.'s alpha = 0.1 N (on J, a sum over the N training points, with alpha times the mean of
        -log q(y|x) over the N_l labelled points) as a weight per labelled point: 0.1 N / N_l."""
        if num_labelled < 1 or num_points < num_labelled:
            raise ValueError(f"need 1 <= num_labelled <= num_points, got {num_labelled} and {num_points}")
        return 0.1 * num_points / num_labelled

    # ----------------------------------------------------------------- building blocks
    def label_prior(self) -> dist.Categorical:
        """p(y) = Categorical(1/C)."""
        return dist.Categorical(logits=self.class_logits)

    def label_posterior(self, x) -> dist.Categorical:
        """q(y|x) = Categorical(softmax(classifier(x))), batch_shape (N,)."""
        return dist.Categorical(logits=self.classifier(self._data(x)))

    def one_hot(self, y: torch.Tensor) -> torch.Tensor:
        """Labels of any shape (..., N) (e.g. enumerated (C, 1)) -> one-hot (..., N, C), by comparison (no host
        read: a captured graph can hold it)."""
        classes = torch.arange(self.num_classes, device=y.device)
        return (y.long()[..., None] == classes).to(self.dtype)

    def _labels(self, y) -> torch.Tensor:
        """Given labels, checked (a vector of integers in [0, C), under Pyro's validation) and as long."""
        self.condition(y)  # the checks of ConditionalVAE
        return torch.as_tensor(y, device=self.class_logits.device).long()

    def _encode_params(self, x, cond=None):
        """q(z|x,y)'s parameters, x (N, *input_shape) and the one-hot y broadcast against each other (an
        enumerated y (C, 1, C) gives (C, N, P))."""
        event = len(self.input_shape)
        lead = torch.broadcast_shapes(x.shape[: x.dim() - event], cond.shape[:-1])
        return super()._encode_params(x.expand(*lead, *self.input_shape), cond)

    def _decode_params(self, z, cond=None):
        lead = torch.broadcast_shapes(z.shape[:-1], cond.shape[:-1])
        return super()._decode_params(z.expand(*lead, self.z_dim), cond)

    # ----------------------------------------------------------------- the two Pyro programs
    def model(self, x=None, y=None, *, batch_size: int | None = None):
        """p(z) p(y) p(x|y,z) in a plate ``"data"``: sites ``"z"``, ``"y"`` (observed where ``y`` is given),
        ``"x"``, and on labelled data the factor ``"aux"`` = aux_weight * log q(y|x). ``x=None`` generates
        ``batch_size`` points (of the classes ``y`` if given)."""
        pyro.module("decoder", self.decoder)
        if any(p.requires_grad for p in self.likelihood.parameters()):
            pyro.module("likelihood", self.likelihood)
        x = None if x is None else self._data(x)
        y = None if y is None else self._labels(y)
        aux = x is not None and y is not None and self.aux_weight > 0
        if aux:
            pyro.module("classifier", self.classifier)
        with pyro.plate("data", self._batch_size(x, y, batch_size)):
            z = pyro.sample("z", self.prior())
            y = pyro.sample("y", self.label_prior(), obs=y)
            out = self._decode_params(z, self.one_hot(y))
            x = pyro.sample("x", self.likelihood(out), obs=x)
            if aux:
                pyro.factor("aux", self.aux_weight * self.label_posterior(x).log_prob(y))
        return x

    def guide(self, x, y=None, *, batch_size: int | None = None):
        """q(y|x) (site ``"y"``, enumerated, only where ``y`` is not given) then q(z|x,y) (site ``"z"``)."""
        pyro.module("encoder", self.encoder)
        if any(p.requires_grad for p in self.posterior.parameters()):
            pyro.module("posterior", self.posterior)
        x = self._data(x)
        if y is None:
            pyro.module("classifier", self.classifier)
        else:
            y = self._labels(y)
        with pyro.plate("data", x.shape[0]):
            if y is None:
                y = pyro.sample("y", self.label_posterior(x), infer={"enumerate": self.label_enumeration})
            return pyro.sample("z", self.posterior(self._encode_params(x, self.one_hot(y))))

    # ----------------------------------------------------------------- classification and figures
    @torch.no_grad()
    def class_probs(self, x) -> torch.Tensor:
        """q(y|x) as probabilities, shape (N, C)."""
        return self.label_posterior(x).probs

    @torch.no_grad()
    def classify(self, x) -> torch.Tensor:
        """argmax_y q(y|x), shape (N,)."""
        return self.classifier(self._data(x)).argmax(-1)

    def _or_predicted(self, x, c):
        return self.classify(x) if c is None else c

    def encode(self, x, c=None) -> dist.TorchDistribution:
        """q(z|x,y) at the labels ``c``, or at argmax q(y|x) when none are given."""
        return super().encode(x, self._or_predicted(x, c))

    def posterior_mean(self, x, c=None) -> torch.Tensor:
        return super().posterior_mean(x, self._or_predicted(x, c))

    def reconstruct(self, x, c=None, sample_z: bool = False) -> torch.Tensor:
        return super().reconstruct(x, self._or_predicted(x, c), sample_z)

    @torch.no_grad()
    def analogies(self, x, c=None) -> torch.Tensor:
        """Kingma et al.'s Figure 1: the style z = E_q[z|x, y] of each x (y its label ``c``, else argmax q(y|x))
        kept, and y varied over the classes: E[x|z, y=k], shape (N, C, *input_shape)."""
        x = self._data(x)
        z = self.posterior_mean(x, c)
        classes = torch.arange(self.num_classes, device=x.device)
        out = self._decode_params(z[:, None, :], self.one_hot(classes)[None])  # (N, C, P, *input_shape)
        return self.likelihood.mean(out)
