"""Figures: samples, reconstructions, the latent space ("encodings of MNIST") and training curves.

Image grids use ``torchvision.utils.save_image``; plots use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import save_image  # noqa: E402
import numpy as np  # noqa: E402
import pyro.poutine as poutine  # noqa: E402

from . import evaluation  # noqa: E402
from .data import prepare_eval_data  # noqa: E402

__all__ = ["save_samples", "save_reconstructions", "plot_latent", "plot_curves", "draw_run_figures", "latent_2d",
           "latent_means", "save_analogies"]


def _grid_images(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] for a grid; non-image data is shown as a 1-pixel-high strip."""
    if x.dim() == 2:
        x = x[:, None, None, :]
    elif x.dim() == 3:
        x = x[:, None]
    if x.shape[-1] < 28:  # enlarge small images (8x8 digits) with nearest-neighbour pixels so they are visible
        x = torch.nn.functional.interpolate(x, scale_factor=-(-28 // x.shape[-1]), mode="nearest")
    return x.clamp(0, 1)


def _own_model(vae) -> bool:
    """A module of the user's own: Pyro programs model/guide, none of the VAE's helpers (sample, reconstruct)."""
    return not (hasattr(vae, "sample") and hasattr(vae, "reconstruct") and hasattr(vae, "posterior_mean"))


def save_samples(vae, path, n: int = 64, nrow: int | None = None, mean: bool = True, like=None, **kwargs) -> Path:
    """Decode n draws z ~ p(z) into an image grid (``E[x|z]`` unless ``mean=False``). A module of the user's
    own is sampled through ``pyro.infer.Predictive`` on ``model(None, batch_size=n)``
    (:func:`pyro_vae.evaluation.sample_model`); ``like``, a few data points, names its observed site and shape."""
    if _own_model(vae):
        if like is None:
            raise ValueError("sampling a model of your own needs a few data points (like=x) to find its observed site")
        observed = evaluation.observed_site(_model_trace(vae, like), like)
        x = evaluation.sample_model(vae.model, n, observed, mean=mean, shape=like.shape[1:])
    else:
        x = vae.sample(n, mean=mean, **kwargs)
    save_image(_grid_images(x.cpu()), path, nrow=nrow or max(1, int(n ** 0.5)), padding=1, pad_value=0.5)
    return Path(path)


def save_reconstructions(vae, x: torch.Tensor, path, n: int = 32, c=None) -> Path:
    """Pairs of rows: originals, then their reconstructions E[x|z=mean of q(z|x)]."""
    x = x[:n]
    if _own_model(vae):  # the guide's mean replayed through the model
        r = evaluation.reconstruct(vae.model, vae.guide, x)
    else:
        r = vae.reconstruct(x, None if c is None else c[:n])
    per_row = min(8, n)
    rows = []
    for i in range(0, x.shape[0], per_row):
        rows += [x[i:i + per_row], r[i:i + per_row]]
    save_image(_grid_images(torch.cat(rows).cpu()), path, nrow=per_row, padding=1, pad_value=0.5)
    return Path(path)


def latent_2d(z: torch.Tensor, method: str = "pca", seed: int = 0):
    """Project posterior means to 2-d: the coordinates themselves when d <= 2, else PCA or t-SNE."""
    z = z.detach().cpu().numpy()
    if z.shape[1] == 1:
        return np.concatenate([z, np.zeros_like(z)], 1), "z"
    if z.shape[1] == 2:
        return z, "z"
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(2, random_state=seed, init="pca", perplexity=min(30, len(z) - 1)).fit_transform(z), "t-SNE"
    if method != "pca":
        raise ValueError(f"unknown projection {method!r}; choose pca or tsne")
    from sklearn.decomposition import PCA

    return PCA(2, random_state=seed).fit_transform(z), "PCA"


def latent_means(vae, x: torch.Tensor, labels=None) -> dict:
    """{site: E_q[z_s | x] of shape (N, d_s)}: the VAE's ``{"z": posterior_mean(x, labels)}``, or for any other
    model (a hierarchy: z1 .. zL; a model of the user's own) every continuous local latent site of its guide, in
    the guide's order (:func:`pyro_vae.evaluation.local_site_means`)."""
    with torch.no_grad():
        if not _own_model(vae):
            return {"z": vae.posterior_mean(x, labels)}
        sites = evaluation.local_sites(vae.model, vae.guide, (x[:2],))
        names = [s.name for s in sites if not getattr(s.fn.support, "is_discrete", False)]
        if not names:
            raise ValueError("the guide has no continuous local latent site to plot")
        return {name: evaluation.local_site_means(vae.model, vae.guide, x, site=name) for name in names}


def plot_latent(vae, x: torch.Tensor, labels, path, method: str = "pca", title: str | None = None) -> Path:
    """The posterior means of ``x`` coloured by label (the "encodings of MNIST" picture), one panel per latent
    site (:func:`latent_means`: a hierarchy's z1 .. zL side by side); a conditional VAE encodes with the labels as
    its condition."""
    means = latent_means(vae, x, labels)
    fig, axes = plt.subplots(1, len(means), figsize=(6 * len(means), 5), squeeze=False)
    c = None if labels is None else labels.cpu().numpy()
    for ax, (name, z) in zip(axes[0], means.items()):
        pts, how = latent_2d(z, method)
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=c, cmap="tab10", s=6, alpha=0.8)
        coordinate = (lambda i: f"{name}_{i}") if name == "z" else (lambda i: f"{name}[{i}]")
        ax.set_xlabel(f"{how} 1" if how != "z" else coordinate(1))
        ax.set_ylabel(f"{how} 2" if how != "z" else coordinate(2))
        ax.set_title(title or f"posterior means E[{name}|x] ({how})")
    if c is not None:
        fig.colorbar(sc, ax=axes[0][-1], label="label")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_curves(metrics: list[dict], path) -> Path:
    """Train objective (as a bound, nats per data point) and validation ELBO against epochs."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [m["epoch"] for m in metrics]
    ax.plot(epochs, [-m["train_loss"] for m in metrics], label="train objective (-loss)")
    if any("val_elbo" in m for m in metrics):
        ax.plot([m["epoch"] for m in metrics if "val_elbo" in m],
                [m["val_elbo"] for m in metrics if "val_elbo" in m], label="validation ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per data point")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def draw_run_figures(run, data=None, latent_method: str = "pca") -> list[Path]:
    """(Re)draw samples.png, reconstructions.png, latent.png and curves.png in the run directory.

    A label-conditional VAE's samples show one row per class; its reconstructions and encodings use the
    test labels as conditions (a plain VAE ignores them)."""
    data = data if data is not None else run.load_data()
    vae, d = run.vae.cpu().eval(), Path(run.dir)
    torch.manual_seed(0)
    x_test = prepare_eval_data(vae, data.x_test, run.config.binarize)
    if _own_model(vae):
        x_test = x_test.to(next(vae.parameters()).dtype)
        samples = save_samples(vae, d / "samples.png", 64, nrow=8, like=x_test[:2])
    else:
        conditions = vae.grid_conditions(per_class=8)
        n = 64 if conditions is None else len(conditions)
        samples = save_samples(vae, d / "samples.png", n, nrow=8, c=conditions)
    labels = None if data.y_test is None else data.y_test[:2000]
    paths = [
        samples,
        save_reconstructions(vae, x_test, d / "reconstructions.png", c=data.y_test),
        plot_latent(vae, x_test[:2000], labels, d / "latent.png", latent_method),
    ]
    if hasattr(vae, "analogies"):  # the semi-supervised M2
        paths.append(save_analogies(vae, x_test[:10], d / "analogies.png"))
    if run.metrics:
        paths.append(plot_curves(run.metrics, d / "curves.png"))
    return paths


def save_analogies(vae, x: torch.Tensor, path) -> Path:
    """Kingma et al.'s analogies (2014, Figure 1): one row per test point x, first x itself, then E[x|z, y=k] for
    every class k with the style z = E_q[z|x, argmax_y q(y|x)] of x kept (:meth:`SemiSupervisedVAE.analogies`)."""
    with torch.no_grad():
        grid = vae.analogies(x)  # (N, C, *input_shape)
    rows = torch.cat([x[:, None], grid], 1).flatten(0, 1)
    save_image(_grid_images(rows.cpu()), path, nrow=grid.shape[1] + 1, padding=1, pad_value=0.5)
    return Path(path)


def _model_trace(vae, x):
    """A trace of ``vae.model(x)`` (latents from the prior), to read its observed site."""
    with torch.no_grad():
        return poutine.trace(vae.model).get_trace(x)
