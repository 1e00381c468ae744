r"""Where inference loses: the amortization and approximation gaps, and test-time refinement.

For a trained VAE (decoder p_theta, encoder q_phi) and a data point x, the inference gap splits in two
(Cremer, Li & Duvenaud, "Inference Suboptimality in Variational Autoencoders", ICML 2018):

    log p(x) - L[q_phi]  =  (log p(x) - L[q*])  +  (L[q*] - L[q_phi])
       inference gap         approximation gap      amortization gap

where L[q] = E_q[log p(x, z) - log q(z)] is the ELBO, q_phi(z|x) the encoder's posterior and q* the member of
the same family with the highest ELBO for this x (its own variational parameters, found by optimization).
The approximation gap is what the family cannot do, the amortization gap what the encoder does not do.

* :func:`inference_gaps` estimates, per point: log p(x) by importance sampling (K = ``num_samples``, the best
  refined posterior as the proposal), L[q_phi], and L[q*_F] for every family F asked for: per-point
  parameters initialised at the encoder's q and optimised by Pyro SVI, all points in one plate
  (:meth:`pyro_vae.VAE.refine`); richer families than the encoder's (full covariance, a flow) show what a
  better family would gain. :func:`write_gaps` writes gaps.json, gaps.md and the figures.
* :func:`refined_evaluation` is test-time refinement for ``pyro-vae evaluate --refine-steps N``: the refined
  ELBO, and log p(x) with the refined posterior as the importance-sampling proposal.
* :func:`importance_sampling`: log p(x) with its Monte Carlo standard error and effective sample size.

Everything runs on :mod:`pyro_vae.particles` (traced for the local guides), so any posterior family, including
one a user writes, gets the analysis. See docs/gaps.md.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from . import evaluation  # noqa: E402
from .data import atomic_write_bytes  # noqa: E402
from .guides import POSTERIORS  # noqa: E402
from .particles import draw_particles, guess_plate_nesting  # noqa: E402

__all__ = ["inference_gaps", "refined_evaluation", "importance_sampling", "write_gaps", "gaps_markdown",
           "plot_gap_bars", "plot_gap_summary", "plot_convergence", "family_name", "mean_and_stderr", "learning_report",
           "DEFAULT_FAMILIES"]

#: the families of ``pyro-vae gaps``: the factorized Gaussian, the full-covariance Gaussian and a flow (IAF)
DEFAULT_FAMILIES = ("diagonal", "cholesky", "flow")


# ---------------------------------------------------------------------------------------------- small helpers
def mean_and_stderr(values: torch.Tensor) -> dict:
    """{"mean", "stderr"} over data points (stderr = sample standard deviation / sqrt(N); 0 for one point)."""
    values = values.detach().double().cpu()
    n = values.numel()
    stderr = float(values.std() / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": float(values.mean()), "stderr": stderr}


def learning_report(model, untrained, x, num_samples: int = 2000, elbo_particles: int = 10, seed: int = 1) -> dict:
    """Did ``model`` learn? Its test ELBO and NLL against ``untrained`` (a copy of it before training), on the same
    points ``x`` with the same noise (``seed``), and the paired gains per point, trained minus untrained:
    ``learned`` in the ELBO and ``learned_log_px`` in the importance-sampled log p(x) (K = ``num_samples``), each
    {"mean", "stderr"}. Works for any module with Pyro ``model(x)`` and ``guide(x)``."""
    scores = {}
    for name, m in (("trained", model), ("untrained", untrained)):
        torch.manual_seed(seed)
        scores[name] = (evaluation.elbo(m.model, m.guide, x, num_particles=elbo_particles),
                        evaluation.log_likelihood(m.model, m.guide, x, num_samples=num_samples, progress=False))
    (elbo, log_px), (elbo0, log_px0) = scores["trained"], scores["untrained"]
    return {"test_elbo": float(elbo.mean()), "test_nll": float(-log_px.mean()),
            "untrained_elbo": float(elbo0.mean()), "untrained_nll": float(-log_px0.mean()),
            "learned": mean_and_stderr(elbo - elbo0), "learned_log_px": mean_and_stderr(log_px - log_px0)}


def family_name(vae, family) -> str:
    """A family's name in reports: ``"flow"`` for an IAF, the ``POSTERIORS`` key, or the class name; None is
    the encoder's own family."""
    if family is None:
        family = vae.posterior
    if isinstance(family, str):
        if family not in POSTERIORS and family != "flow":
            raise ValueError(f"unknown posterior family {family!r}; choose among {', '.join(_choices())}")
        return "flow" if family == "iaf" else family
    name = next((k for k, v in POSTERIORS.items() if type(family) is v), type(family).__name__)
    return "flow" if name == "iaf" else name


def _choices() -> list[str]:
    return ["flow", *sorted(k for k in POSTERIORS if k != "iaf")]


def _args(x, c) -> tuple:
    return (x,) if c is None else (x, c)


def _particles_per_pass(x: torch.Tensor, num_particles: int) -> int:
    """Particles per vectorized pass over all N points: the evaluation's memory budget, and on the CPU about
    ``evaluation.CPU_PASS_CELLS`` (particle, point) pairs per pass."""
    n = x.shape[0]
    chunk = evaluation.chunk_size_for_budget(evaluation.DEFAULT_MEMORY_BUDGET, n, x[0].numel(), x.element_size())
    if x.device.type == "cpu":
        chunk = min(chunk, max(1, evaluation.CPU_PASS_CELLS // n))
    return max(1, min(int(num_particles), chunk))


@torch.no_grad()
def _elbo(model, guide, x, c, num_particles: int) -> torch.Tensor:
    """Per-point ELBO with ``num_particles`` particles, averaged over memory-bounded passes, shape (N,)."""
    chunk, total, done = _particles_per_pass(x, num_particles), 0.0, 0
    while done < num_particles:
        k = min(chunk, num_particles - done)
        total = total + k * evaluation.elbo(model, guide, _args(x, c), num_particles=k, batch_size=None)
        done += k
    return total / num_particles


@torch.no_grad()
def importance_sampling(model, guide, args: tuple, num_samples: int = 5000, chunk_size: int | None = None) -> dict:
    r"""log p(x_n) ~ log (1/K) sum_k w_k, w_k = p(x_n, z_k) / q(z_k|x_n), z_k ~ q (K = ``num_samples``), for the
    points of one batch ``args`` (every site in one batch plate), with

    * ``stderr``: its delta-method Monte Carlo standard error, sqrt(Var(w) / (K E[w]^2)) =
      sqrt(sum_k w_k^2 / (sum_k w_k)^2 - 1/K);
    * ``ess``: the effective sample size (sum_k w_k)^2 / sum_k w_k^2, in [1, K].

    A better proposal q gives a smaller ``stderr`` and a larger ``ess``. Particles are drawn ``chunk_size`` at
    a time (default: the evaluation's memory budget). Returns a dict of (N,) tensors.
    """
    num_samples = int(num_samples)
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    chunk = int(chunk_size or _particles_per_pass(args[0], num_samples))
    nesting: list[int] = []

    def plate_nesting():
        if not nesting:
            nesting.append(guess_plate_nesting(model, guide, args, {}))
        return nesting[0]

    draws = []

    def chunks():  # log w and 2 log w of each chunk of particles, for logsumexp_k w_k and logsumexp_k w_k^2
        for start in range(0, num_samples, chunk):
            draws[:] = [draw_particles(model, guide, args, {}, num_particles=min(chunk, num_samples - start),
                                       plate_nesting=plate_nesting)]  # one chunk alive at a time
            lw = draws[-1].log_weights
            yield torch.stack([lw, 2 * lw], 1)

    lse1, lse2 = evaluation.streaming_logsumexp(chunks()).unbind(0)
    p = draws[-1]
    rel_var = (torch.exp(lse2 - 2 * lse1) - 1.0 / num_samples).clamp_min(0.0)
    n = p.per_point(lse1).shape[0]
    return {"log_px": p.per_point(lse1 - math.log(num_samples)), "stderr": p.per_point(rel_var).sqrt(),
            "ess": torch.exp(2 * lse1 - lse2).reshape(n, -1).mean(-1)}


def _convergence(trace: list[float], points: int = 200) -> dict:
    """The SVI objective per step, as block means (at most ``points``), and the gain of the last tenth of the
    steps over the tenth before it, with its standard error (about 0 once the optimization has converged)."""
    t = torch.tensor(trace, dtype=torch.float64)
    out = {"steps": len(trace), "step": [], "objective": [], "final_gain": None}
    if not len(trace):
        return out
    block = max(1, math.ceil(len(trace) / points))
    for start in range(0, len(trace), block):
        out["step"].append(start + min(block, len(trace) - start))
        out["objective"].append(float(t[start:start + block].mean()))
    w = len(trace) // 10
    if w >= 2:
        last, before = t[-w:], t[-2 * w:-w]
        se = math.sqrt(float(last.var() / w + before.var() / w))
        out["final_gain"] = {"mean": float(last.mean() - before.mean()), "stderr": se, "window": w}
    return out


# ---------------------------------------------------------------------------------------------- the gaps
def inference_gaps(vae, x, c=None, families=DEFAULT_FAMILIES, *, steps: int = 500, num_samples: int = 5000,
                   num_particles: int = 4, elbo_particles: int = 100, lr: float = 0.01,
                   progress: bool = False) -> dict:
    r"""The inference gap of each data point of ``x`` split into approximation and amortization gaps.

    For every family F of ``families`` (names of ``pyro_vae.guides.POSTERIORS``, ``"flow"`` for an IAF, or
    :class:`~pyro_vae.guides.PosteriorFamily` instances; None is the encoder's own family), the locally optimal
    q*_F: per-point parameters initialised at the encoder's q (:meth:`pyro_vae.VAE.local_posterior`) and
    optimised by ``steps`` steps of SVI with ``num_particles`` particles (:meth:`pyro_vae.VAE.refine`, Adam at
    ``lr`` decaying to lr/10), vectorized over the points. Then, per point,

        L[q_phi], L[q*_F]   ELBOs with ``elbo_particles`` particles each,
        log p(x)            importance sampling with K = ``num_samples`` draws of the best q*_F (highest
                            mean L[q*_F]),
        approximation gap   log p(x) - L[q*_F],
        amortization gap    L[q*_F] - L[q_phi]   (Cremer et al.'s when F is the encoder's family; for a
                            richer family it also holds what the richer family gains).

    Returns a JSON-ready dict: the settings, ``log_px``, ``amortized_elbo`` and per family ``elbo``,
    ``approximation_gap``, ``amortization_gap`` as {mean, stderr} over the points, the convergence of the
    local optimization (objective per step, ``final_gain``), and ``per_point`` values. ``c``: the conditions
    of a conditional VAE. The VAE's weights are not changed; the global Pyro param store is left as it was.
    """
    x = vae._data(x)
    names = [family_name(vae, f) for f in families]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"give one or more distinct families, got {names}")
    with pyro.get_param_store().scope():
        amortized = _elbo(vae.model, vae.guide, x, c, elbo_particles)
        locals_, elbos = {}, {}
        for name, family in zip(names, families):
            if progress:
                print(f"local optimisation: {name}, {steps} steps, {x.shape[0]} points", flush=True)
            locals_[name] = vae.refine(x, c, steps, family=family, num_particles=num_particles, lr=lr)
            elbos[name] = _elbo(vae.model, locals_[name].guide, x, c, elbo_particles)
        proposal = max(elbos, key=lambda n: float(elbos[n].mean()))
        if progress:
            print(f"log p(x): importance sampling, K={num_samples}, proposal {proposal}", flush=True)
        est = importance_sampling(vae.model, locals_[proposal].guide, _args(x, c), num_samples)
    settings = {"num_points": int(x.shape[0]), "steps": int(steps), "num_particles": int(num_particles),
                "elbo_particles": int(elbo_particles), "num_samples": int(num_samples), "lr": float(lr),
                "encoder_family": family_name(vae, None), "proposal": proposal}
    return _report(settings, est, amortized, elbos, {n: local.trace for n, local in locals_.items()})


def _report(settings: dict, est: dict, amortized: torch.Tensor, elbos: dict, traces: dict) -> dict:
    log_px = est["log_px"]
    report = dict(settings)
    report["log_px"] = {**mean_and_stderr(log_px), "is_stderr": float(est["stderr"].mean()),
                        "ess": float(est["ess"].mean())}
    report["amortized_elbo"] = mean_and_stderr(amortized)
    report["inference_gap"] = mean_and_stderr(log_px - amortized)
    report["families"] = {n: {"elbo": mean_and_stderr(e), "approximation_gap": mean_and_stderr(log_px - e),
                              "amortization_gap": mean_and_stderr(e - amortized),
                              "convergence": _convergence(traces[n])} for n, e in elbos.items()}
    report["per_point"] = {"log_px": log_px.tolist(), "log_px_is_stderr": est["stderr"].tolist(),
                           "amortized_elbo": amortized.tolist(), **{f"elbo_{n}": e.tolist() for n, e in elbos.items()}}
    return report


# ---------------------------------------------------------------------------------------------- refinement
def refined_evaluation(vae, x, c=None, *, steps: int, num_samples: int = 5000, elbo_particles: int = 10,
                       batch_size: int = 256, num_particles: int = 4, lr: float = 0.01,
                       compare_proposals: bool = True) -> dict:
    r"""Test-time refinement (``pyro-vae evaluate --refine-steps N``): per batch of ``batch_size`` points, the
    encoder's posterior refined by ``steps`` SVI steps (:meth:`pyro_vae.VAE.refine`), then

    * ``refined_elbo``: the ELBO of the refined posterior (``elbo_particles`` particles per point);
    * ``refined_nll``: -log p(x), importance sampled with the refined posterior as the proposal (K =
      ``num_samples``), ``refined_nll_stderr`` its standard error over the points;
    * ``refined_is_stderr`` / ``refined_ess``: the mean Monte Carlo standard error of log p(x_n) and the mean
      effective sample size of that estimator; with ``compare_proposals`` also ``amortized_is_stderr`` /
      ``amortized_ess`` for the encoder's own posterior as the proposal (one more importance-sampling pass):
      a better proposal has a smaller standard error.
    """
    x = vae._data(x)
    parts: dict[str, list] = {}
    with pyro.get_param_store().scope():
        for start in range(0, x.shape[0], int(batch_size)):
            xb = x[start:start + int(batch_size)]
            cb = None if c is None else c[start:start + int(batch_size)]
            local = vae.refine(xb, cb, steps, num_particles=num_particles, lr=lr)
            parts.setdefault("elbo", []).append(_elbo(vae.model, local.guide, xb, cb, elbo_particles))
            proposals = {"refined": local.guide, "amortized": vae.guide} if compare_proposals else \
                {"refined": local.guide}
            for name, guide in (proposals.items() if num_samples else ()):
                est = importance_sampling(vae.model, guide, _args(xb, cb), num_samples)
                for key, value in est.items():
                    parts.setdefault(f"{name}_{key}", []).append(value)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    result = {"refine_steps": int(steps), "refined_elbo": float(cat["elbo"].mean())}
    if num_samples:
        nll = mean_and_stderr(-cat["refined_log_px"])
        result.update(refined_nll=nll["mean"], refined_nll_stderr=nll["stderr"])
        for name in proposals:
            result[f"{name}_is_stderr"] = float(cat[f"{name}_stderr"].mean())
            result[f"{name}_ess"] = float(cat[f"{name}_ess"].mean())
    return result


# ---------------------------------------------------------------------------------------------- reports
def _pm(stat: dict) -> str:
    return f"{stat['mean']:.2f} ± {stat['stderr']:.2f}"


def gaps_markdown(report: dict) -> str:
    """The report as a Markdown table (nats per data point, ± standard errors over the points)."""
    own = report["encoder_family"]
    lines = [f"{report['num_points']} points; local optimisation: {report['steps']} SVI steps, "
             f"{report['num_particles']} particles; ELBOs with {report['elbo_particles']} particles; log p(x) by "
             f"importance sampling, K = {report['num_samples']}, proposal: the refined {report['proposal']} "
             f"posterior (mean Monte Carlo s.e. {report['log_px']['is_stderr']:.3f}, "
             f"mean ESS {report['log_px']['ess']:.0f}).", "",
             "| | nats |", "|---|---|",
             f"| log p(x) | {_pm(report['log_px'])} |",
             f"| L[q_phi] (amortized, {own} encoder) | {_pm(report['amortized_elbo'])} |",
             f"| inference gap log p(x) - L[q_phi] | {_pm(report['inference_gap'])} |", "",
             "| family F | L[q*_F] | approximation gap log p(x) - L[q*_F] | L[q*_F] - L[q_phi] | "
             "last-10% gain of the local optimisation |", "|---|---|---|---|---|"]
    for name, f in report["families"].items():
        gain = f["convergence"]["final_gain"]
        gain = f"{gain['mean']:.3f} ± {gain['stderr']:.3f}" if gain else "-"
        label = f"{name} (the encoder's: amortization gap)" if name == own else name
        lines.append(f"| {label} | {_pm(f['elbo'])} | {_pm(f['approximation_gap'])} | "
                     f"{_pm(f['amortization_gap'])} | {gain} |")
    return "\n".join(lines) + "\n"


def plot_gap_bars(report: dict, family: str, path, title: str | None = None) -> Path:
    """Per data point (sorted by the inference gap), the stacked gaps for one family F: L[q*_F] - L[q_phi]
    (the amortization gap for the encoder's family) below, log p(x) - L[q*_F] (approximation) above."""
    pp = report["per_point"]
    log_px, amortized = torch.tensor(pp["log_px"]), torch.tensor(pp["amortized_elbo"])
    local = torch.tensor(pp[f"elbo_{family}"])
    order = torch.argsort(log_px - amortized)
    amort, approx = (local - amortized)[order], (log_px - local)[order]
    f = report["families"][family]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    idx = range(len(order))
    ax.bar(idx, amort.tolist(), width=1.0, color="tab:orange",
           label=f"L[q*] - L[q_phi] = {_pm(f['amortization_gap'])}")
    ax.bar(idx, approx.tolist(), width=1.0, bottom=amort.clamp_min(0).tolist(), color="tab:blue",
           label=f"log p(x) - L[q*] = {_pm(f['approximation_gap'])}")
    ax.set_xlabel("data point (sorted by inference gap)")
    ax.set_ylabel("nats")
    ax.set_title(title or f"{family} family, {report['encoder_family']} encoder")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_gap_summary(reports: dict, path, title: str | None = None) -> Path:
    """One stacked bar (mean ± s.e. over points) per (model, family): ``reports`` maps a model label (e.g. the
    family it was trained with) to its :func:`inference_gaps` report."""
    fig, ax = plt.subplots(figsize=(2 + 1.1 * sum(len(r["families"]) for r in reports.values()), 4.2))
    ticks, labels, x = [], [], 0
    for model, report in reports.items():
        for name, f in report["families"].items():
            am, ap = f["amortization_gap"], f["approximation_gap"]
            own = name == report["encoder_family"]
            ax.bar(x, am["mean"], yerr=am["stderr"], color="tab:orange", capsize=3, hatch="" if own else "//")
            ax.bar(x, ap["mean"], bottom=max(am["mean"], 0), yerr=ap["stderr"], color="tab:blue", capsize=3)
            ticks.append(x)
            labels.append(f"{model}\nq*: {name}")
            x += 1
        x += 0.5
    ax.axhline(0, color="black", lw=0.8)
    handles = [Patch(color="tab:orange", label="L[q*] - L[q_phi]: amortization gap (own family)"),
               Patch(facecolor="tab:orange", hatch="//", label="L[q*] - L[q_phi] (another family)"),
               Patch(color="tab:blue", label="log p(x) - L[q*]: approximation gap")]
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("nats per data point")
    ax.set_title(title or "inference gap = amortization + approximation")
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_convergence(report: dict, path) -> Path:
    """The local optimisation's objective (mean ELBO estimate per point) against SVI steps, per family, with the
    amortized ELBO and log p(x) as horizontal lines: flat curves at the end mean the local optimum was reached."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, f in report["families"].items():
        conv = f["convergence"]
        ax.plot(conv["step"], conv["objective"], label=f"q*: {name}")
    ax.axhline(report["amortized_elbo"]["mean"], color="gray", ls="--", label="L[q_phi] (amortized)")
    ax.axhline(report["log_px"]["mean"], color="black", ls=":", label="log p(x)")
    lows = [min(f["convergence"]["objective"][len(f["convergence"]["objective"]) // 5:] or [0])
            for f in report["families"].values()]
    top = report["log_px"]["mean"]
    ax.set_ylim(min(lows + [report["amortized_elbo"]["mean"]]) - 0.5, top + 0.25 * (top - min(lows) + 1))
    ax.set_xlabel("SVI step")
    ax.set_ylabel("ELBO per data point (nats)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_gaps(report: dict, out_dir) -> list[Path]:
    """Write gaps.json, gaps.md, gaps-<family>.png (one per family), gaps-summary.png and
    gaps-convergence.png into ``out_dir`` (created if needed); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "gaps.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out / "gaps.md", gaps_markdown(report).encode())
    paths = [out / "gaps.json", out / "gaps.md"]
    paths += [plot_gap_bars(report, name, out / f"gaps-{name}.png") for name in report["families"]]
    paths.append(plot_gap_summary({f"{report['encoder_family']} encoder": report}, out / "gaps-summary.png"))
    paths.append(plot_convergence(report, out / "gaps-convergence.png"))
    return paths


# ---------------------------------------------------------------------------------------------- any model/guide
# Inference gaps of a model/guide pair of the user's own (docs/own-model.md): the per-point local optimisation
# covers every latent site of the guide inside the data plate, jointly, as one vector per point.
import pyro.distributions as _dist  # noqa: E402

from .guides import LocalPosterior as _LocalPosterior, make_posterior as _make_posterior  # noqa: E402
from .guides import marginal_moments as _marginal_moments  # noqa: E402

#: the families of ``pyro-vae gaps`` for a model of the user's own: over all local latents of a point together
OWN_MODEL_FAMILIES = ("diagonal", "cholesky")


class SiteLocalPosterior(_LocalPosterior):
    r"""A non-amortized guide over the N points of ``x`` for *any* model: per point n, the values of the local
    latent sites s = 1..S (each a scalar or a vector per point) stacked into one vector u_n in R^D,
    D = sum_s d_s, with q(u_n) = family(lambda_n) (a diagonal Gaussian, a full-covariance Gaussian, ...):

        u_n ~ family(lambda_n)   (an auxiliary site, inside the data plate)
        z_sn = u_n[slice_s]      (Delta sites named as the guide's, so the model replays against them)

    so that log q(z_1n, ..., z_Sn | x_n) = log family(u_n; lambda_n): the ELBO and importance weights of the
    traced particles are those of the joint q. ``sites``: (name, start, stop, event_shape) per site;
    ``plate``: the data plate's name (at dim -1).
    """

    def __init__(self, family, params, sites: list, plate: str, name: str = "local_posterior"):
        super().__init__(family, params, (), name)
        self.sites, self.plate = list(sites), plate

    def guide(self, x, *args, **kwargs):
        pyro.module(self.name, self)
        n = x.shape[0]
        if n != self.num_points:
            raise ValueError(f"this local posterior holds {self.num_points} data points but was given a batch of {n}:"
                             " evaluate it on the same points, in one batch (batch_size=None)")
        with pyro.plate(self.plate, n, dim=-1):
            u = pyro.sample(f"_{self.name}_joint", self.posterior(), infer={"is_auxiliary": True})
            for name, start, stop, event_shape in self.sites:
                value = u[..., start:stop].reshape(u.shape[:-1] + tuple(event_shape))
                pyro.sample(name, _dist.Delta(value, event_dim=len(event_shape)))
        return u


def _gap_sites(model, guide, x) -> tuple[list, str]:
    """The guide's local latent sites (continuous, real-valued, one scalar or vector per point, data plate at
    dim -1) and the data plate's name; anything else is a one-line ValueError naming the site."""
    traces = evaluation.trace_pair(model, guide, (x,))
    sites = evaluation.local_sites(model, guide, (x,), traces)
    if not sites:
        raise ValueError("the guide has no latent site inside the data plate: nothing to optimise per point")
    for s in sites:
        if not (_is_real(s.fn.support) and s.is_vector and s.dim == -1):
            raise ValueError(f"inference gaps optimise a Gaussian over the real-valued local latents of each point; "
                             f"guide site {s.name!r} ({type(s.fn).__name__}, support {s.fn.support}, shape "
                             f"{tuple(s.shape)}) is not one real scalar or vector per point in a data plate at dim -1")
    plate = next(f.name for f in sites[0].guide_site["cond_indep_stack"] if f.vectorized and f.dim == sites[0].dim)
    return sites, plate


def _is_real(constraint) -> bool:
    """Whether a support is the reals (per coordinate): ``real``, ``real_vector``, ``independent(real, k)``."""
    while isinstance(constraint, torch.distributions.constraints.independent):
        constraint = constraint.base_constraint
    return type(constraint) is type(torch.distributions.constraints.real)


@torch.no_grad()
def _joint_moments(model, guide, x, sites, num_samples: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(mean, standard deviation) of u_n per point, (N, D), from the guide: one site's marginal moments in
    closed form where its distribution has them, else (several sites, whose conditionals may depend on one
    another) the moments of ``num_samples`` joint draws of the guide."""
    n = x.shape[0]
    if len(sites) == 1:
        loc, scale = _marginal_moments(sites[0].fn)
        return sites[0].per_point(loc, n), sites[0].per_point(scale, n)
    draws = {s.name: [] for s in sites}
    for _ in range(int(num_samples)):
        trace = pyro.poutine.trace(guide).get_trace(x)
        for s in sites:
            draws[s.name].append(s.per_point(trace.nodes[s.name]["value"], n))
    stacked = torch.cat([torch.stack(draws[s.name]) for s in sites], -1)  # (S, N, D)
    return stacked.mean(0), stacked.std(0)


def local_site_posterior(model, guide, x, family="diagonal", *, name: str = "local_posterior") -> SiteLocalPosterior:
    """A :class:`SiteLocalPosterior` for the points ``x``, started at the guide's marginal moments (means and
    standard deviations of every local coordinate, no correlation: ``family.init_local``)."""
    sites, plate = _gap_sites(model, guide, x)
    loc, scale = _joint_moments(model, guide, x, sites)
    layout, start = [], 0
    for s in sites:
        d = math.prod(s.fn.event_shape)
        layout.append((s.name, start, start + d, tuple(s.fn.event_shape)))
        start += d
    target = _make_posterior("iaf" if family == "flow" else family, start).to(device=x.device, dtype=loc.dtype)
    return SiteLocalPosterior(target, target.init_local(loc, scale), layout, plate, name)


def refine_sites(model, guide, x, steps: int = 100, *, family="diagonal", num_particles: int = 4,
                 lr: float = 0.01) -> SiteLocalPosterior:
    r"""Per-point local optimisation for any model: maximize sum_n ELBO(x_n; lambda_n) over the parameters of a
    :class:`SiteLocalPosterior` by ``steps`` steps of Pyro SVI (one vectorized problem over the N points;
    ``num_particles`` vectorized particles; ClippedAdam at ``lr`` decaying to lr/10), the model frozen (the
    parameters of the module owning ``model`` keep their values and ``requires_grad``)."""
    local = local_site_posterior(model, guide, x, family)
    nesting = guess_plate_nesting(model, local.guide, (x,), {})
    loss = pyro.infer.Trace_ELBO(num_particles=int(num_particles), vectorize_particles=True,
                                 max_plate_nesting=nesting)
    owner = getattr(model, "__self__", None)
    owner = owner if isinstance(owner, torch.nn.Module) else torch.nn.Module()
    frozen, training = [(p, p.requires_grad) for p in owner.parameters()], owner.training
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        owner.eval()
        with pyro.validation_enabled(False):  # the traces were validated once (_gap_sites); 4x faster steps
            local.fit(model, x, steps=steps, num_particles=num_particles, lr=lr, loss=loss)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        owner.train(training)
    return local


def guide_name(guide) -> str:
    """``Class.guide`` for a bound method, else the function's name (how reports name a user's guide)."""
    owner = getattr(guide, "__self__", None)
    return f"{type(owner).__name__}.{guide.__name__}" if owner is not None else getattr(guide, "__name__", "guide")


def model_inference_gaps(model, guide, x, families=OWN_MODEL_FAMILIES, *, steps: int = 500,
                         num_samples: int = 5000, num_particles: int = 4, elbo_particles: int = 100,
                         lr: float = 0.01, progress: bool = False) -> dict:
    r""":func:`inference_gaps` for any model/guide pair: per point, L[q_phi] (the user's guide), L[q*_F] for each
    family F over all local latents of the point together (:func:`refine_sites`: ``"diagonal"``, a
    factorized Gaussian; ``"cholesky"``, a full-covariance Gaussian; other names of
    ``pyro_vae.guides.POSTERIORS`` work too), log p(x) by importance sampling with the best q*_F as the
    proposal, and

        approximation gap  log p(x) - L[q*_F],      L[q*_F] - L[q_phi]  (the amortization gap when F is the
        guide's own family).

    The same report as :func:`inference_gaps` (:func:`write_gaps`, :func:`gaps_markdown` draw it); the global
    Pyro param store is left as it was.
    """
    names = ["flow" if f == "iaf" else f for f in families]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"give one or more distinct families, got {names}")
    for f in names:
        family_name(None, f)  # an unknown name fails here
    with pyro.get_param_store().scope():
        amortized = _elbo(model, guide, x, None, elbo_particles)
        locals_, elbos = {}, {}
        for name in names:
            if progress:
                print(f"local optimisation: {name}, {steps} steps, {x.shape[0]} points", flush=True)
            locals_[name] = refine_sites(model, guide, x, steps, family=name, num_particles=num_particles, lr=lr)
            elbos[name] = _elbo(model, locals_[name].guide, x, None, elbo_particles)
        proposal = max(elbos, key=lambda n: float(elbos[n].mean()))
        if progress:
            print(f"log p(x): importance sampling, K={num_samples}, proposal {proposal}", flush=True)
        est = importance_sampling(model, locals_[proposal].guide, (x,), num_samples)
    settings = {"num_points": int(x.shape[0]), "steps": int(steps), "num_particles": int(num_particles),
                "elbo_particles": int(elbo_particles), "num_samples": int(num_samples), "lr": float(lr),
                "encoder_family": guide_name(guide), "proposal": proposal}
    return _report(settings, est, amortized, elbos, {n: local.trace for n, local in locals_.items()})
