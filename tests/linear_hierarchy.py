r"""A two-layer linear-Gaussian hierarchy with everything in closed form, as a :class:`~pyro_vae.HierarchicalVAE`.

    z_2 ~ N(0, I),    z_1 | z_2 ~ N(A z_2 + a, S_1),    x | z_1 ~ N(B z_1 + b, sigma^2 I)

built from the HierarchicalVAE itself with linear networks (``deterministic=((), ())``, a fixed-sigma Gaussian
likelihood; each Gaussian head's scale row has zero weights, so its variance is a constant). A is "axis
aligned" (A = [diag(alpha); 0]) and B has orthogonal columns, so both exact posteriors are diagonal and
representable by either guide:

* bottom-up: p(z_1 | x) p(z_2 | z_1)            (z_2 is independent of x given z_1)
* top-down:  p(z_2 | x) p(z_1 | z_2, x), the second the precision-weighted combination of p(z_1 | z_2) and the
  bottom-up term N(B^T (x - b) / beta^2, sigma^2 / beta^2)

Closed forms: log p(x) = log N(x; B a + b, B (A A^T + S_1) B^T + sigma^2 I); for any guide whose layers are
linear-Gaussian, its joint q(z_1, z_2 | x) is Gaussian and the ELBO is an expectation of Gaussian log densities.
Float64 throughout.
"""
from __future__ import annotations

import math

import torch

from pyro_vae.hierarchical import HierarchicalVAE

D, D1, D2 = 4, 3, 2
SIGMA = 0.625  # exact in float32 (the likelihood stores sigma as a float32 tensor before .double())


def make(inference: str, exact: bool = True, seed: int = 0):
    """(model, params): the linear-Gaussian HierarchicalVAE (exact posterior as its guide, or a random linear one)."""
    g = torch.Generator().manual_seed(seed)
    t = dict(dtype=torch.float64)
    alpha = 0.5 + torch.rand(D2, generator=g, **t)
    A = torch.zeros(D1, D2, **t)
    A[range(D2), range(D2)] = alpha
    a = 0.3 * torch.randn(D1, generator=g, **t)
    s1 = 0.4 + 0.5 * torch.rand(D1, generator=g, **t)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, **t))
    beta = 0.8 + torch.rand(D1, generator=g, **t)
    B = Q[:, :D1] * beta
    b = 0.2 * torch.randn(D, generator=g, **t)
    p = dict(A=A, a=a, s1=s1, B=B, b=b, beta=beta)
    torch.manual_seed(seed)
    m = HierarchicalVAE((D,), (D1, D2), inference=inference, likelihood="gaussian", sigma=SIGMA,
                        deterministic=((), ())).double()
    with torch.no_grad():
        _set(m.decoder[1][0], A, a, m.families[0].raw_scale(s1))
        _set(m.decoder[0][0], B, b)
        if exact:
            _exact_guide(m, p)
        else:
            for head in m.encoder["heads"]:
                head.weight[head.out_features // 2:] = 0  # constant scales: q stays linear-Gaussian
    return m, p


def _set(linear, weight, bias, raw=None):
    d = weight.shape[0]
    linear.weight.zero_()
    linear.weight[:d] = weight
    linear.bias[:d] = bias
    if raw is not None:
        linear.bias[d:] = raw


def _exact_guide(m, p):
    A, a, s1, B, b, beta = (p[k] for k in ("A", "a", "s1", "B", "b", "beta"))
    heads, fam = m.encoder["heads"], m.families
    if m.inference == "bottom-up":
        prec1 = 1 / (A @ A.T + torch.diag(s1 ** 2)).diagonal() + beta ** 2 / SIGMA ** 2
        v1 = 1 / prec1
        W1 = v1[:, None] * B.T / SIGMA ** 2
        c1 = v1 * (a / (A @ A.T + torch.diag(s1 ** 2)).diagonal()) - W1 @ b
        _set(heads[0], W1, c1, fam[0].raw_scale(v1.sqrt()))
        C2 = torch.linalg.inv(torch.eye(D2, dtype=A.dtype) + A.T @ torch.diag(s1 ** -2) @ A)
        W2 = C2 @ A.T @ torch.diag(s1 ** -2)
        _set(heads[1], W2, -W2 @ a, fam[1].raw_scale(C2.diagonal().sqrt()))
        return
    F, f = B @ A, B @ a + b
    R = B @ torch.diag(s1 ** 2) @ B.T + SIGMA ** 2 * torch.eye(D, dtype=A.dtype)
    V2 = torch.linalg.inv(torch.eye(D2, dtype=A.dtype) + F.T @ torch.linalg.solve(R, F))
    assert torch.allclose(V2, torch.diag(V2.diagonal()), atol=1e-12)
    W2 = V2 @ F.T @ torch.linalg.inv(R)
    _set(heads[1], W2, -W2 @ f, fam[1].raw_scale(V2.diagonal().sqrt()))
    W1 = B.T / beta[:, None] ** 2
    _set(heads[0], W1, -W1 @ b, fam[0].raw_scale(SIGMA / beta))


def log_marginal(p, x):
    cov = p["B"] @ (p["A"] @ p["A"].T + torch.diag(p["s1"] ** 2)) @ p["B"].T + SIGMA ** 2 * torch.eye(D, dtype=x.dtype)
    return torch.distributions.MultivariateNormal(p["B"] @ p["a"] + p["b"], cov).log_prob(x)


def _normal(dist):
    return dist.base_dist.loc, dist.base_dist.scale ** 2


def guide_joint(m, x):
    """(mean (d1 + d2), covariance) of q(z_1, z_2 | x) for one point x (D,), read off the linear layers."""
    x = x[None]
    eye = torch.eye(D2, dtype=x.dtype)
    if m.inference == "bottom-up":
        m1, v1 = _normal(m.families[0](m.encoder["heads"][0](x)))
        head = m.encoder["heads"][1]
        G, g = head.weight[:D2], head.bias[:D2]
        _, v2 = _normal(m.families[1](head(m1)))
        S11 = torch.diag(v1[0])
        mean = torch.cat([m1[0], G @ m1[0] + g])
        cov = torch.cat([torch.cat([S11, S11 @ G.T], 1), torch.cat([G @ S11, G @ S11 @ G.T + torch.diag(v2[0])], 1)])
        return mean, cov
    d = m._features(x)
    m2, v2 = _normal(m.families[1](m.encoder["heads"][1](d[1])))
    h, v1 = _normal(m._ladder_step(1, d[0], torch.zeros(1, D2, dtype=x.dtype)))
    H = torch.stack([_normal(m._ladder_step(1, d[0], eye[j:j + 1]))[0][0] - h[0] for j in range(D2)], 1)
    V2 = torch.diag(v2[0])
    mean = torch.cat([H @ m2[0] + h[0], m2[0]])
    cov = torch.cat([torch.cat([H @ V2 @ H.T + torch.diag(v1[0]), H @ V2], 1), torch.cat([V2 @ H.T, V2], 1)])
    return mean, cov


def _expected_log_normal(P, p0, S, mean, cov):
    """E over w ~ N(mean, cov) of log N(e; 0, S), e = P w + p0."""
    r = P @ mean + p0
    second = P @ cov @ P.T + torch.outer(r, r)
    k = S.shape[0]
    return -0.5 * (k * math.log(2 * math.pi) + torch.logdet(S) + torch.trace(torch.linalg.solve(S, second)))


def elbo(m, p, x):
    """The closed-form ELBO of m's guide, per row of x (N, D)."""
    out = []
    t = dict(dtype=x.dtype)
    for xn in x:
        mean, cov = guide_joint(m, xn)
        I1, I2 = torch.eye(D1, **t), torch.eye(D2, **t)
        lik = _expected_log_normal(torch.cat([-p["B"], torch.zeros(D, D2, **t)], 1), xn - p["b"],
                                   SIGMA ** 2 * torch.eye(D, **t), mean, cov)
        mid = _expected_log_normal(torch.cat([I1, -p["A"]], 1), -p["a"], torch.diag(p["s1"] ** 2), mean, cov)
        top = _expected_log_normal(torch.cat([torch.zeros(D2, D1, **t), I2], 1), torch.zeros(D2, **t), I2, mean, cov)
        entropy = 0.5 * torch.logdet(2 * math.pi * math.e * cov)
        out.append(lik + mid + top + entropy)
    return torch.stack(out)


def sample(p, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    t = dict(dtype=p["A"].dtype)
    z2 = torch.randn(n, D2, generator=g, **t)
    z1 = z2 @ p["A"].T + p["a"] + p["s1"] * torch.randn(n, D1, generator=g, **t)
    return z1 @ p["B"].T + p["b"] + SIGMA * torch.randn(n, D, generator=g, **t)
