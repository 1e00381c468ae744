r"""Gradient estimators for variational objectives: score function (REINFORCE) vs reparameterization.

Two studies live here.

**The toy study** (:func:`toy_gradient_study`) reproduces the textbook comparison on

.. math::  \min_\phi\ \mathbb{E}_{x\sim\mathcal N(\phi, 1)}[x^2] = \phi^2 + 1,
           \qquad \nabla_\phi = 2\phi .

Writing :math:`x = \phi + \epsilon`, :math:`\epsilon \sim \mathcal N(0, 1)`, the two single-sample estimators are

* score function (log-derivative trick), :math:`\nabla_\phi \log \mathcal N(x;\phi,1) = x - \phi`:
  :math:`g_{SF} = x^2 (x - \phi) = \phi^2\epsilon + 2\phi\epsilon^2 + \epsilon^3`;
* reparameterization (pathwise): :math:`g_{RP} = \partial_\phi (\phi+\epsilon)^2 = 2(\phi + \epsilon)`.

Both have mean :math:`2\phi` (odd Gaussian moments vanish, :math:`\mathbb E\epsilon^2 = 1`). With
:math:`\mathbb E\epsilon^4 = 3`, :math:`\mathbb E\epsilon^6 = 15`:

.. math::
   \mathbb E g_{SF}^2 = \phi^4 \mathbb E\epsilon^2 + 4\phi^2 \mathbb E\epsilon^4 + \mathbb E\epsilon^6
        + 4\phi^3 \mathbb E\epsilon^3 + 2\phi^2 \mathbb E\epsilon^4 + 4\phi \mathbb E\epsilon^5
        = \phi^4 + 18\phi^2 + 15,

   \operatorname{Var} g_{SF} = \phi^4 + 14\phi^2 + 15, \qquad \operatorname{Var} g_{RP} = 4,

and the mean of N independent samples has variance ``single / N``. See ``docs/gradient-variance.md``.

**The VAE study** (:func:`vae_gradient_study`) measures, for the encoder (guide) parameters of a real Pyro
VAE, the per-coordinate variance and signal-to-noise ratio of one-batch gradient estimates under named
estimators ("reparam", "score", "score+baseline", "analytic", "iwae-K", "dreg-K", "stl-K").
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import pyro  # noqa: E402

from ..objectives import make_objective  # noqa: E402
from ..score_function import score_function  # noqa: E402

__all__ = [
    "DEFAULT_SAMPLE_SIZES",
    "DEFAULT_VAE_ESTIMATORS",
    "gaussian_polynomial_moment",
    "score_function_variance",
    "reparameterization_variance",
    "score_function_excess_kurtosis",
    "toy_gradient_study",
    "write_toy_study",
    "plot_gradient_variance",
    "plot_vae_gradient_study",
    "make_estimator",
    "gradient_samples",
    "summarize_gradients",
    "vae_gradient_study",
    "write_vae_study",
]

DEFAULT_SAMPLE_SIZES = (10, 100, 1000, 10000, 100000)
ESTIMATOR_NAMES = ("score_function", "reparameterization")

# ---------------------------------------------------------------------------------------------------------
# Part 1: closed forms
# ---------------------------------------------------------------------------------------------------------


def _std_normal_moment(k: int) -> float:
    """E[eps^k] for eps ~ N(0, 1): 0 for odd k, (k-1)!! for even k."""
    if k % 2:
        return 0.0
    return float(math.prod(range(k - 1, 0, -2))) if k else 1.0


def gaussian_polynomial_moment(coeffs: Sequence[float], power: int = 1, central: bool = False) -> float:
    r"""E[g(eps)^power] for the polynomial g(eps) = sum_k coeffs[k] eps^k, eps ~ N(0, 1).

    Exact (no sampling): expands g^power and uses E eps^{2m} = (2m-1)!!, odd moments 0. With
    ``central=True`` the mean of g is subtracted first, i.e. E[(g - E g)^power].
    """
    c = np.asarray(coeffs, dtype=float)
    if central:
        c = c.copy()
        c[0] -= gaussian_polynomial_moment(coeffs, 1)
    p = np.polynomial.polynomial.polypow(c, power)
    return float(sum(ck * _std_normal_moment(k) for k, ck in enumerate(p)))


def _score_poly(phi: float) -> list[float]:
    """g_SF(eps) = (phi + eps)^2 eps = phi^2 eps + 2 phi eps^2 + eps^3, lowest power first."""
    return [0.0, phi ** 2, 2.0 * phi, 1.0]


def _reparam_poly(phi: float) -> list[float]:
    """g_RP(eps) = 2 (phi + eps)."""
    return [2.0 * phi, 2.0]


def score_function_variance(phi: float) -> float:
    r"""Variance of ONE score-function sample :math:`x^2(x-\phi)`, :math:`x\sim\mathcal N(\phi,1)`.

    With :math:`x = \phi + \epsilon`, :math:`g = \phi^2\epsilon + 2\phi\epsilon^2 + \epsilon^3`,
    :math:`\mathbb E g = 2\phi`,
    :math:`\mathbb E g^2 = \phi^4 \cdot 1 + 4\phi^2 \cdot 3 + 15 + 2\phi^2 \cdot 3 = \phi^4 + 18\phi^2 + 15`
    (odd moments vanish; :math:`\mathbb E\epsilon^{2,4,6} = 1, 3, 15`), so
    :math:`\operatorname{Var} g = \phi^4 + 14\phi^2 + 15`. Divide by N for the N-sample mean.
    """
    phi = float(phi)
    return phi ** 4 + 14.0 * phi ** 2 + 15.0


def reparameterization_variance(phi: float) -> float:
    r"""Variance of ONE reparameterization sample :math:`2(\phi+\epsilon)`: :math:`4 \operatorname{Var}\epsilon = 4`,
    independent of :math:`\phi`; divide by N for the N-sample mean."""
    del phi
    return 4.0


def _excess_kurtosis(coeffs) -> float:
    """Excess kurtosis mu4 / sigma^4 - 3 of a polynomial in a standard normal (exact)."""
    var = gaussian_polynomial_moment(coeffs, 2, central=True)
    mu4 = gaussian_polynomial_moment(coeffs, 4, central=True)
    return mu4 / var ** 2 - 3.0


def score_function_excess_kurtosis(phi: float) -> float:
    """Excess kurtosis of one score-function sample (exact, via Gaussian moments up to eps^12)."""
    return _excess_kurtosis(_score_poly(phi))


_CLOSED_FORMS = {
    "score_function": (score_function_variance, _score_poly),
    "reparameterization": (reparameterization_variance, _reparam_poly),
}


def _variance_of_sample_variance(var_mean: float, excess_kurt_single: float, n: int, reps: int) -> float:
    r"""Exact Var(s^2) of the unbiased sample variance of R i.i.d. copies of an N-sample mean.

    For i.i.d. Y with variance :math:`\sigma^2` and excess kurtosis :math:`\kappa`,
    :math:`\operatorname{Var}(s^2) = \sigma^4 (\kappa / R + 2 / (R - 1))`. The mean of N i.i.d. draws has
    :math:`\kappa_N = \kappa_1 / N` (fourth cumulant scales as N^{-3}, variance squared as N^{-2}).
    """
    kappa_n = excess_kurt_single / n
    return var_mean ** 2 * (kappa_n / reps + 2.0 / (reps - 1))


# ---------------------------------------------------------------------------------------------------------
# Part 1: the Monte Carlo study
# ---------------------------------------------------------------------------------------------------------


def _toy_means(phi: float, n: int, reps: int, gen: torch.Generator, max_elements: int) -> dict[str, torch.Tensor]:
    """R independent N-sample means of both estimators, drawn in chunks of <= max_elements normals.

    Both estimators are evaluated on the same eps (common random numbers); each one's statistics are
    still those of R independent repetitions.
    """
    chunk = max(1, max_elements // n)
    out = {name: torch.empty(reps, dtype=torch.float64) for name in ESTIMATOR_NAMES}
    for start in range(0, reps, chunk):
        stop = min(reps, start + chunk)
        eps = torch.randn(stop - start, n, generator=gen, dtype=torch.float64)
        x = phi + eps
        out["score_function"][start:stop] = (x * x * eps).mean(1)   # x^2 (x - phi)
        out["reparameterization"][start:stop] = (2.0 * x).mean(1)   # d/dphi (phi + eps)^2
    return out


def _toy_row(name: str, phi: float, n: int, means: torch.Tensor) -> dict:
    reps = means.numel()
    var_fn, poly = _CLOSED_FORMS[name]
    cf_single = var_fn(phi)
    cf = cf_single / n
    emp_var = float(means.var(unbiased=True))
    kurt = _excess_kurtosis(poly(phi))
    return {
        "estimator": name,
        "phi": float(phi),
        "N": int(n),
        "repetitions": int(reps),
        "exact_gradient": 2.0 * float(phi),
        "mean": float(means.mean()),
        "variance": emp_var,
        "closed_form_variance": cf,
        "closed_form_single_sample_variance": cf_single,
        "se_mean": math.sqrt(emp_var / reps),
        "se_mean_closed_form": math.sqrt(cf / reps),
        "se_variance_closed_form": math.sqrt(_variance_of_sample_variance(cf, kurt, n, reps)),
        "excess_kurtosis_single_sample": kurt,
    }


def toy_gradient_study(phi: float = 1.0, sample_sizes: Iterable[int] = DEFAULT_SAMPLE_SIZES,
                       repetitions: int = 1000, seed: int = 0, max_elements: int = 1 << 22) -> list[dict]:
    r"""Empirical mean/variance of the N-sample score-function and reparameterization gradient estimates.

    Objective :math:`\mathbb E_{x\sim\mathcal N(\phi,1)}[x^2]`, exact gradient :math:`2\phi`. For each N in
    ``sample_sizes`` draws ``repetitions`` independent N-sample means of each estimator (vectorized, in
    chunks of at most ``max_elements`` normals, float64) and returns one row per (estimator, N) with keys
    ``estimator, phi, N, repetitions, exact_gradient, mean, variance, closed_form_variance,
    closed_form_single_sample_variance, se_mean, se_mean_closed_form, se_variance_closed_form,
    excess_kurtosis_single_sample``. Closed forms: :func:`score_function_variance` / N and
    :func:`reparameterization_variance` / N.
    """
    sizes = [int(n) for n in sample_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sample_sizes must be positive integers, got {sample_sizes!r}")
    if repetitions < 2:
        raise ValueError(f"repetitions must be >= 2 to estimate a variance, got {repetitions}")
    gen = torch.Generator().manual_seed(int(seed))
    rows = []
    for n in sizes:
        means = _toy_means(float(phi), n, int(repetitions), gen, max_elements)
        rows += [_toy_row(name, float(phi), n, means[name]) for name in ESTIMATOR_NAMES]
    return rows


_TOY_COLUMNS = ("estimator", "N", "mean", "se_mean", "exact_gradient", "variance", "closed_form_variance",
                "se_variance_closed_form")


def _markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _study_paths(out_dir, rows, stem: str) -> dict[str, Path]:
    """``{md, json, png}`` paths ``out_dir/stem.*``, the folder created; no rows is an error."""
    if not rows:
        raise ValueError("no rows to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {k: out / f"{stem}.{k}" for k in ("md", "json", "png")}


def write_toy_study(out_dir, rows: Sequence[Mapping]) -> dict[str, Path]:
    """Write ``gradient_variance_toy.{md,json,png}`` into ``out_dir`` (created); returns the paths."""
    paths = _study_paths(out_dir, rows, "gradient_variance_toy")
    phi = rows[0].get("phi")
    head = (f"# Gradient variance: score function vs reparameterization\n\n"
            f"Objective E_{{x~N(phi,1)}}[x^2], phi = {phi}, exact gradient 2*phi = {rows[0].get('exact_gradient')}; "
            f"{rows[0].get('repetitions')} repetitions per N.\n"
            f"Closed forms: Var_SF = (phi^4 + 14 phi^2 + 15)/N, Var_RP = 4/N.\n\n")
    paths["md"].write_text(head + _markdown_table(rows, _TOY_COLUMNS))
    paths["json"].write_text(json.dumps(list(rows), indent=2))
    plot_gradient_variance(rows, paths["png"])
    return paths


# ---------------------------------------------------------------------------------------------------------
# Part 2: named estimators
# ---------------------------------------------------------------------------------------------------------
#
# An estimator is a callable ``est(model, guide, x)``. It either returns a differentiable loss tensor
# (the gradient estimate is its gradient) or returns None after having called ``backward`` itself, in
# which case the estimate is read from ``.grad``. Optional attributes, for estimators with state such as a
# running-average baseline: ``warmup_steps``, calls to make (and discard) before measuring, and ``reset()``,
# called first.

DEFAULT_VAE_ESTIMATORS = ("reparam", "score", "score+baseline", "analytic",
                          "iwae-1", "iwae-5", "iwae-50", "dreg-1", "dreg-5", "dreg-50",
                          "stl-1", "stl-5", "stl-50")


def _differentiable(objective) -> Callable:
    def est(model, guide, x):
        return objective.differentiable_loss(model, guide, x)
    est.objective = objective
    return est


def _score_estimator(baseline: bool, baseline_beta: float = 0.9, warmup_steps: int = 30) -> Callable:
    elbo = pyro.infer.TraceGraph_ELBO()
    options = {"use_decaying_avg_baseline": True, "baseline_beta": baseline_beta} if baseline else None

    def est(model, guide, x):
        elbo.loss_and_grads(model, score_function(guide, baseline=options), x)
        return None

    def reset():
        """Forget running-average baselines (Pyro keeps them in the param store, shaped like the batch)."""
        store = pyro.get_param_store()
        for key in [k for k in store.keys() if k.startswith("__baseline_avg_downstream_cost_")]:
            del store[key]

    est.warmup_steps = warmup_steps if baseline else 0
    est.reset = reset
    return est


def _objective(name: str, num_particles: int, estimator: str | None = None):
    return make_objective(name, num_particles=num_particles, estimator=estimator)


def make_estimator(name: str) -> Callable:
    """The estimator called ``name``.

    * ``"reparam"`` / ``"reparam-K"``: ``Trace_ELBO(num_particles=K).differentiable_loss`` (pathwise).
    * ``"score"``: ``TraceGraph_ELBO`` with every guide latent made non-reparameterized (REINFORCE, with
      Pyro's plate-wise Rao-Blackwellization of downstream costs).
    * ``"score+baseline"``: the same plus Pyro's decaying-average baseline (beta 0.9, 30 warm-up calls).
    * ``"analytic"``: ``make_objective("analytic")`` (closed-form KL).
    * ``"iwae-K"``, ``"dreg-K"``, ``"stl-K"``: ``make_objective("iwae", num_particles=K,
      estimator="iwae" | "dreg" | "stl")``.
    """
    base, _, k = name.partition("-")
    if k and not k.isdigit():
        raise ValueError(f"bad estimator name {name!r}: the suffix after '-' must be a particle count")
    particles = int(k) if k else 1
    if particles < 1:
        raise ValueError(f"bad estimator name {name!r}: need at least one particle")
    if base == "reparam":
        return _differentiable(pyro.infer.Trace_ELBO(num_particles=particles))
    if name in ("score", "score+baseline"):
        return _score_estimator(baseline=name.endswith("baseline"))
    if base == "analytic":
        return _differentiable(_objective("analytic", particles))
    if base in ("iwae", "dreg", "stl"):
        return _differentiable(_objective("iwae", particles, base))
    raise ValueError(f"unknown estimator {name!r}; known: reparam[-K], score, score+baseline, analytic, "
                     "iwae-K, dreg-K, stl-K")


def _resolve_estimators(estimators) -> dict[str, Callable]:
    if isinstance(estimators, Mapping):
        return {str(k): (make_estimator(v) if isinstance(v, str) else v) for k, v in estimators.items()}
    if isinstance(estimators, str):
        estimators = [estimators]
    return {str(n): make_estimator(n) for n in estimators}


# ---------------------------------------------------------------------------------------------------------
# Part 2: the study
# ---------------------------------------------------------------------------------------------------------


def _clear_grads(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        p.grad = None
    for p in pyro.get_param_store().values():
        p.grad = None


def _one_gradient(est, model, guide, x, params) -> torch.Tensor:
    """One gradient estimate w.r.t. ``params``, flattened into a vector (float64)."""
    _clear_grads(params)
    loss = est(model, guide, x)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    else:
        grads = [p.grad for p in params]
    _clear_grads(params)
    if all(g is None for g in grads):
        raise RuntimeError("the estimator produced no gradient for any of encoder_params: are they the "
                           "tensors the guide uses (e.g. list(encoder.parameters()) after pyro.module)?")
    flat = [torch.zeros(p.numel(), dtype=torch.float64) if g is None else g.detach().reshape(-1).double()
            for p, g in zip(params, grads)]
    return torch.cat(flat)


def gradient_samples(estimator, model, guide, encoder_params, data_batch, repetitions: int = 100,
                     seed: int = 0, warmup: int | None = None) -> torch.Tensor:
    """``repetitions`` independent gradient estimates for ``encoder_params``, as a (R, D) float64 tensor.

    Parameters are never updated. ``estimator.reset()`` is called if present, then ``warmup`` calls (default:
    ``estimator.warmup_steps`` or 0) are made and discarded, so stateful baselines are measured in their
    steady state.
    """
    est = make_estimator(estimator) if isinstance(estimator, str) else estimator
    params = list(encoder_params)
    if not params:
        raise ValueError("encoder_params is empty")
    if repetitions < 2:
        raise ValueError(f"repetitions must be >= 2, got {repetitions}")
    if callable(getattr(est, "reset", None)):
        est.reset()
    pyro.set_rng_seed(seed)
    for _ in range(getattr(est, "warmup_steps", 0) if warmup is None else warmup):
        _one_gradient(est, model, guide, data_batch, params)
    return torch.stack([_one_gradient(est, model, guide, data_batch, params) for _ in range(repetitions)])


def summarize_gradients(name: str, grads: torch.Tensor) -> dict:
    r"""Summary of a (R, D) sample of gradient estimates.

    Per coordinate j: mean :math:`m_j`, unbiased variance :math:`v_j`, :math:`\mathrm{SNR}_j = |m_j|/\sqrt{v_j}`
    (Rainforth et al., 2018). Reported: ``mean_snr`` (average over coordinates with v_j > 0),
    ``median_snr``, ``total_variance`` = sum_j v_j, ``mean_variance``, ``mean_squared_norm`` = mean_r ||g_r||^2,
    ``squared_norm_of_mean`` = ||m||^2 (so total_variance ~= mean_squared_norm - squared_norm_of_mean).
    """
    reps, dim = grads.shape
    mean = grads.mean(0)
    var = grads.var(0, unbiased=True)
    live = var > 0
    snr = mean[live].abs() / var[live].sqrt()
    return {
        "estimator": name,
        "repetitions": int(reps),
        "num_coordinates": int(dim),
        "mean_snr": float(snr.mean()) if snr.numel() else float("nan"),
        "median_snr": float(snr.median()) if snr.numel() else float("nan"),
        "total_variance": float(var.sum()),
        "mean_variance": float(var.mean()),
        "mean_squared_norm": float(grads.pow(2).sum(1).mean()),
        "squared_norm_of_mean": float(mean.pow(2).sum()),
    }


def vae_gradient_study(model, guide, encoder_params, data_batch, estimators=DEFAULT_VAE_ESTIMATORS,
                       repetitions: int = 100, seed: int = 0, warmup: int | None = None) -> list[dict]:
    """Variance and SNR of one-batch gradient estimates of the encoder (guide) parameters.

    :param model, guide: a Pyro model/guide pair taking ``data_batch`` as their only argument.
    :param encoder_params: the guide's parameter tensors (e.g. ``list(vae.encoder.parameters())``).
    :param estimators: names (see :func:`make_estimator`) or a mapping name -> name-or-callable; a
        callable ``est(model, guide, x)`` returns a loss to differentiate, or None after calling backward.
    :returns: one row per estimator (keys of :func:`summarize_gradients` plus ``seconds``), each estimator
        run from the same ``seed``.
    """
    rows = []
    for name, est in _resolve_estimators(estimators).items():
        t0 = time.perf_counter()
        g = gradient_samples(est, model, guide, encoder_params, data_batch, repetitions, seed, warmup)
        row = summarize_gradients(name, g)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return rows


_VAE_COLUMNS = ("estimator", "repetitions", "num_coordinates", "mean_snr", "median_snr", "total_variance",
                "mean_variance", "mean_squared_norm", "squared_norm_of_mean", "seconds")


def write_vae_study(out_dir, rows: Sequence[Mapping]) -> dict[str, Path]:
    """Write ``gradient_variance_vae.{md,json,png}`` into ``out_dir`` (created); returns the paths."""
    paths = _study_paths(out_dir, rows, "gradient_variance_vae")
    head = ("# Encoder-gradient variance on a VAE\n\n"
            "One-batch gradient estimates of the encoder parameters; SNR = |mean| / std per coordinate, "
            "averaged over coordinates.\n\n")
    paths["md"].write_text(head + _markdown_table(rows, _VAE_COLUMNS))
    paths["json"].write_text(json.dumps(list(rows), indent=2))
    plot_vae_gradient_study(rows, paths["png"])
    return paths


# ----------------------------------------------------------------- gradient-variance studies
_STYLE = {"score_function": ("tab:red", "o", "score function"),
          "reparameterization": ("tab:blue", "s", "reparameterization")}


def plot_gradient_variance(rows: Sequence[Mapping], path) -> Path:
    """Log-log plot of the variance of the N-sample gradient estimate against N, one colour per estimator.

    Empirical variances are markers (with +-1 standard-error bars from ``se_variance_closed_form`` when
    present); closed forms ``closed_form_variance`` are lines. Rows as from ``toy_gradient_study``.
    """
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    for i, name in enumerate(names):
        sel = sorted((r for r in rows if r["estimator"] == name), key=lambda r: r["N"])
        n = np.array([r["N"] for r in sel], dtype=float)
        color, marker, label = _STYLE.get(name, (f"C{i}", "o", name))
        ax.plot(n, [r["closed_form_variance"] for r in sel], "-", color=color, lw=1.2,
                label=f"{label} (closed form)")
        err = [r.get("se_variance_closed_form", 0.0) for r in sel]
        ax.errorbar(n, [r["variance"] for r in sel], yerr=err, fmt=marker, color=color, ms=5, mfc="none",
                    capsize=2, label=f"{label} (empirical)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of samples N")
    ax.set_ylabel("variance of the gradient estimate")
    phi = rows[0].get("phi") if rows else None
    ax.set_title(f"Gradient variance, E[x^2], x ~ N(phi={phi}, 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_vae_gradient_study(rows: Sequence[Mapping], path) -> Path:
    """Two bar charts per estimator: total variance of the encoder gradient (log scale) and mean SNR."""
    names = [r["estimator"] for r in rows]
    x = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(6.0, 0.6 * len(names) + 3), 3.8))
    ax1.bar(x, [max(r["total_variance"], 1e-300) for r in rows], color="tab:red")
    ax1.set_yscale("log")
    ax1.set_ylabel("total variance (sum over coordinates)")
    ax2.bar(x, [r["mean_snr"] for r in rows], color="tab:blue")
    ax2.set_ylabel("mean SNR = |mean| / std")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle("Encoder-gradient estimators")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
