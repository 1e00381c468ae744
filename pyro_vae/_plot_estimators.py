"""Plots for the gradient-estimator studies (to be merged into ``pyro_vae/plots.py``).

matplotlib with the Agg backend (no display needed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_gradient_variance", "plot_vae_gradient_study"]

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
