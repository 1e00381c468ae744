"""--compile / fit(compile=True): the trace-free loss under torch.compile, equal to eager; eager where it cannot."""
import shutil

import pytest
import torch

import pyro

from pyro_vae import VAE, fit, load_dataset
from pyro_vae.training import ObjectiveModule

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="torch.compile's CPU backend needs a C++ compiler (g++ or c++)")


def tiny(guide="diagonal"):
    torch.manual_seed(0)
    return VAE(input_shape=(1, 4, 4), z_dim=2, hidden=(8,), guide=guide)


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("objective", ["elbo", "analytic", "iwae"])
def test_compiled_loss_and_gradients_equal_eager(objective):
    vae = tiny()
    x = torch.bernoulli(torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1)))
    options = {"num_particles": 3} if objective == "iwae" else {}
    from pyro_vae.objectives import make_objective

    results = []
    for compile in (False, True):
        module = ObjectiveModule(vae, make_objective(objective, **options), compile=compile)
        pyro.set_rng_seed(5)
        loss = module(x)
        grads = torch.autograd.grad(loss, list(vae.parameters()))
        results.append((loss.detach(), grads))
        assert module.compiled == compile
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@needs_compiler
def test_fit_with_compile_trains_as_eager_and_reports_the_compile_time():
    data = load_dataset("digits")
    histories = [fit(tiny_digits(data), data.x_train[:200], epochs=2, batch_size=50, progress=False, compile=c)
                 for c in (False, True)]
    eager, compiled = histories
    assert [m["train_loss"] for m in compiled] == pytest.approx([m["train_loss"] for m in eager], rel=1e-4)
    assert compiled[0]["compile_seconds"] > 0 and "compile_seconds" not in compiled[1]


def tiny_digits(data):
    torch.manual_seed(0)
    return VAE(data.input_shape, z_dim=2, hidden=(16,))


def test_without_a_working_compiler_training_falls_back_to_eager(monkeypatch):
    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("Compiler: g++ is not found\nmore details")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    data = load_dataset("digits")
    with pytest.warns(RuntimeWarning, match=r"torch.compile is unavailable here \(RuntimeError: Compiler: g\+\+ is "
                                            r"not found\); running eagerly instead"):
        history = fit(tiny_digits(data), data.x_train[:100], epochs=1, batch_size=50, progress=False, compile=True)
    eager = fit(tiny_digits(data), data.x_train[:100], epochs=1, batch_size=50, progress=False)
    assert history[0]["train_loss"] == eager[0]["train_loss"] and "compile_seconds" not in history[0]


def test_the_compile_flag_reaches_training_from_the_command_line(monkeypatch, tmp_path):
    import json

    from pyro_vae.cli import main

    calls = []

    def recording_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn  # compiled == eager: the plumbing is what is tested here

    monkeypatch.setattr(torch, "compile", recording_compile)
    run = tmp_path / "run"
    assert main(["train", "--compile", "--epochs", "1", "--z-dim", "2", "--hidden", "8", "--no-progress",
                 "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["compile"] is True
    assert calls and calls[0]["options"] == {"fallback_random": True} and calls[0]["mode"] is None


@pytest.mark.slow
@needs_compiler
def test_compiled_log_likelihood_equals_eager():
    from pyro_vae.evaluation import log_likelihood

    vae = tiny()
    x = torch.bernoulli(torch.rand(7, 1, 4, 4, generator=torch.Generator().manual_seed(2)))
    estimates = []
    for compile in (False, True):
        pyro.set_rng_seed(4)
        estimates.append(log_likelihood(vae.model, vae.guide, x, num_samples=60, chunk_size=20, batch_size=4,
                                        progress=False, compile=compile))
    torch.testing.assert_close(estimates[0], estimates[1], rtol=1e-5, atol=1e-5)


def test_compile_in_evaluation_needs_a_twin():
    from linear_gaussian import LinearGaussian
    from pyro_vae.evaluation import log_likelihood

    lg = LinearGaussian.random()
    x = lg.sample(3)
    with pytest.warns(RuntimeWarning, match="needs a model/guide with a trace-free twin"):
        estimate = log_likelihood(lg.model, lg.exact_guide, x, num_samples=10, progress=False, compile=True)
    torch.testing.assert_close(estimate, lg.log_marginal(x))
