r"""A linear-Gaussian latent variable model with everything in closed form, for testing objectives.

    z ~ N(0, I_d),    x | z ~ N(W z + b, sigma^2 I_D)       (inside a batch plate "data")

* marginal:   log p(x) = log N(x; b, W W^T + sigma^2 I_D)
* posterior:  p(z | x) = N(m, S),  S = (I + W^T W / sigma^2)^-1,  m = S W^T (x - b) / sigma^2
* ELBO of any Gaussian guide N(mu, Sigma):
      E_q log p(x|z) = -D/2 log(2 pi sigma^2) - (||x - W mu - b||^2 + tr(W Sigma W^T)) / (2 sigma^2)
      KL(N(mu, Sigma) || N(0, I)) = 1/2 (tr Sigma + mu^T mu - d - log det Sigma)

Usable by any test: ``lg = LinearGaussian.random(d=2, D=4)``, ``x = lg.sample(5)``, ``lg.model(x)``,
``lg.exact_guide``, ``lg.offset_guide(shift, widen)``, ``diagonal_guide(loc, scale)``, ``lg.elbo(x, loc, cov)``,
``lg.log_marginal(x)``, ``lg.renyi_bound(x, loc, cov, alpha)``.
Everything is float64 by default so closed-form comparisons are not limited by float32 round-off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import pyro
import pyro.distributions as dist

__all__ = ["LinearGaussian", "diagonal_guide", "mvn_guide", "lowrank_guide"]


@dataclass
class LinearGaussian:
    W: torch.Tensor  # (D, d)
    b: torch.Tensor  # (D,)
    sigma: float
    prior: str = "diagonal"  # "diagonal": Normal(0, 1).to_event(1); "mvn": MultivariateNormal(0, I)

    @classmethod
    def random(cls, d: int = 2, D: int = 4, sigma: float = 0.7, prior: str = "diagonal", seed: int = 0,
               dtype=torch.float64) -> "LinearGaussian":
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(D, d, generator=g, dtype=dtype)
        b = 0.5 * torch.randn(D, generator=g, dtype=dtype)
        return cls(W, b, sigma, prior)

    @property
    def d(self) -> int:
        return self.W.shape[1]

    @property
    def D(self) -> int:
        return self.W.shape[0]

    def prior_dist(self):
        zeros = torch.zeros(self.d, dtype=self.W.dtype)
        if self.prior == "mvn":
            return dist.MultivariateNormal(zeros, scale_tril=torch.eye(self.d, dtype=self.W.dtype))
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    # ------------------------------------------------------------------ Pyro program
    def model(self, x: torch.Tensor):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior_dist())
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def sample(self, n: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.d, generator=g, dtype=self.W.dtype)
        return z @ self.W.T + self.b + self.sigma * torch.randn(n, self.D, generator=g, dtype=self.W.dtype)

    # ------------------------------------------------------------------ closed forms
    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_n) for each row, shape (N,)."""
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.D, dtype=self.W.dtype)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def posterior(self, x: torch.Tensor):
        """(m of shape (N, d), S of shape (d, d)) of the exact posterior p(z | x)."""
        S = torch.linalg.inv(torch.eye(self.d, dtype=self.W.dtype) + self.W.T @ self.W / self.sigma**2)
        m = (x - self.b) @ self.W @ S / self.sigma**2  # rows: S W^T (x - b) / sigma^2 (S symmetric)
        return m, S

    def exact_guide(self, x: torch.Tensor):
        m, S = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(m, S))

    def offset_posterior(self, x: torch.Tensor, shift: float = 0.0, widen: float = 1.0):
        """(loc, scale), each (N, d), of the diagonal Gaussian N(m + shift * s, (widen * s)^2), s = sqrt(diag S):
        the exact posterior's diagonal approximation, shifted and widened."""
        m, S = self.posterior(x)
        sd = S.diagonal().sqrt()
        return m + shift * sd, (widen * sd).expand_as(m)

    def offset_guide(self, shift: float = 0.0, widen: float = 1.0):
        """An amortized guide x -> N(m(x) + shift * s, (widen * s)^2) (works with any batch of x)."""
        def guide(x):
            loc, scale = self.offset_posterior(x, shift, widen)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))
        return guide

    def elbo(self, x: torch.Tensor, loc: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """Closed-form ELBO per row for the guide N(loc_n, cov_n); loc (N, d), cov (d, d) or (N, d, d)."""
        cov = cov.expand(x.shape[0], self.d, self.d)
        resid = x - loc @ self.W.T - self.b
        expected_sq = resid.pow(2).sum(-1) + torch.einsum("ij,njk,ik->n", self.W, cov, self.W)
        expected_loglik = -0.5 * self.D * math.log(2 * math.pi * self.sigma**2) - expected_sq / (2 * self.sigma**2)
        kl = 0.5 * (cov.diagonal(dim1=-2, dim2=-1).sum(-1) + loc.pow(2).sum(-1) - self.d - torch.logdet(cov))
        return expected_loglik - kl


    def renyi_bound(self, x: torch.Tensor, loc: torch.Tensor, cov: torch.Tensor, alpha: float) -> torch.Tensor:
        """Closed-form variational Renyi bound per row, L_alpha = 1/(1-alpha) log E_q[(p(x,z)/q(z|x))^(1-alpha)]
        = log p(x) - D_alpha(q || p(z|x)), for the guide q = N(loc_n, cov_n) and 0 <= alpha < 1, with the
        Renyi divergence of Gaussians P = N(m1, S1), Q = N(m2, S2) and S_a = a S2 + (1 - a) S1:
            D_a(P || Q) = a/2 (m1 - m2)^T S_a^-1 (m1 - m2) - 1/(2 (a - 1)) log(det S_a / (det S1^(1-a) det S2^a)).
        """
        m, S = self.posterior(x)
        cov = cov.expand(x.shape[0], self.d, self.d)
        if alpha == 0:
            return self.log_marginal(x)
        s_a = alpha * S + (1 - alpha) * cov
        diff = (loc - m).unsqueeze(-1)
        quad = (diff.transpose(-1, -2) @ torch.linalg.solve(s_a, diff)).reshape(-1)
        log_ratio = torch.logdet(s_a) - (1 - alpha) * torch.logdet(cov) - alpha * torch.logdet(S)
        divergence = alpha / 2 * quad - log_ratio / (2 * (alpha - 1))
        return self.log_marginal(x) - divergence


def diagonal_guide(loc: torch.Tensor, scale: torch.Tensor):
    """q(z|x_n) = N(loc_n, diag scale_n^2) as a guide (loc, scale: (N, d) tensors, may require grad)."""
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
    return guide


def mvn_guide(loc: torch.Tensor, scale_tril: torch.Tensor):
    """q(z|x_n) = N(loc_n, L L^T) as a guide (loc (N, d), scale_tril (d, d) or (N, d, d))."""
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))
    return guide


def lowrank_guide(loc: torch.Tensor, cov_factor: torch.Tensor, cov_diag: torch.Tensor):
    """q(z|x_n) = N(loc_n, F F^T + diag(cov_diag)) as a guide."""
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag))
    return guide
