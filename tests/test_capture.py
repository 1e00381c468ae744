"""Capture (pyro_vae.compiling): any model/guide and objective recorded into one graph, equal to eager.

Most tests run the recorded graph as recorded (``compile="graph"``, ``Captured(compile=False)``): what capture
records is what is tested, in seconds. The tests marked slow add Inductor, whose first compilation of a graph
takes tens of seconds on this CPU.
"""
import json
import math
import shutil

import pytest
import torch
from torch import nn

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine

from pyro_vae import VAE, ConditionalVAE, fit, load_dataset
from pyro_vae.compiling import Captured, gradient_program
from pyro_vae.evaluation import elbo, log_likelihood
from pyro_vae.objectives import AnalyticKLELBO, IWAEELBO, MonteCarloELBO, RenyiBound
from pyro_vae.training import Callback, ObjectiveModule
from tiny_vae import TinyVAE

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="Inductor's CPU backend needs a C++ compiler (g++ or c++)")

OBJECTIVES = {
    "montecarlo": lambda: MonteCarloELBO(),
    "analytic": lambda: AnalyticKLELBO(),
    "iwae": lambda: IWAEELBO(num_particles=3),
    "dreg": lambda: IWAEELBO(num_particles=3, estimator="dreg"),
    "stl": lambda: IWAEELBO(num_particles=3, estimator="stl"),
    "renyi": lambda: RenyiBound(alpha=0.5, num_particles=3),
}


def make(model: str):
    """(module, batch) for a user's tutorial-style VAE or pyro_vae's own models with several guides."""
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    if model == "user":
        return TinyVAE(), (x,)
    if model == "cvae":
        return ConditionalVAE((1, 8, 8), num_classes=3, z_dim=2, hidden=(16,), prior="learned"), \
            (x, torch.arange(10) % 3)
    return VAE((1, 8, 8), z_dim=2, hidden=(16,), guide=model), (x,)


def eager_and_captured(module, objective, batch, compile=False):
    """(loss, grads) of the eager step and of the captured one, for the same random state."""
    step = gradient_program(ObjectiveModule(module, objective)._loss, list(module.parameters()))
    captured = Captured(step, lambda: list(module.parameters()), compile=compile)
    results = []
    for fn in (step, captured, captured):  # the second captured call runs the graph already recorded
        pyro.set_rng_seed(7)
        with pyro.validation_enabled(False):
            results.append(fn(*batch))
    assert captured.captured and len(captured.graphs) == 1
    return results


#: the (model, objective) pairs of the default run: every model and objective once; the rest with -m slow
QUICK = {("user", "montecarlo"), ("user", "dreg"), ("iaf", "stl"), ("cholesky", "analytic"), ("cvae", "iwae"),
         ("lowrank", "dreg"), ("diagonal", "renyi")}


@pytest.mark.parametrize("model, objective", [
    pytest.param(m, o, marks=() if (m, o) in QUICK else pytest.mark.slow)
    for m in ("user", "diagonal", "cholesky", "lowrank", "iaf", "cvae") for o in OBJECTIVES])
def test_the_recorded_step_equals_eager_for_the_same_random_state(model, objective):
    """Loss and every gradient, DReG/STL's stop-gradients and hooks and closed-form KLs included."""
    module, batch = make(model)
    eager, first, again = eager_and_captured(module, OBJECTIVES[objective](), batch)
    for a, b, c in zip(eager, first, again):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("model, objective", [("user", "analytic"), ("iaf", "dreg"), ("cholesky", "stl")])
def test_the_compiled_step_equals_eager(model, objective):
    module, batch = make(model)
    eager, first, again = eager_and_captured(module, OBJECTIVES[objective](), batch, compile=True)
    for a, b, c in zip(eager, first, again):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


def test_parameters_are_read_live_and_each_call_draws_fresh_noise():
    module, batch = make("user")
    step = gradient_program(AnalyticKLELBO().bind(module.model, module.guide), list(module.parameters()))
    captured = Captured(step, lambda: list(module.parameters()), compile=False)
    losses = [float(captured(*batch)[0]) for _ in range(2)]
    assert losses[0] != losses[1]  # new noise per call
    with torch.no_grad():
        module.decoder[0].bias.add_(1.0)  # an optimizer's in-place update
    pyro.set_rng_seed(3)
    expected = step(*batch)
    pyro.set_rng_seed(3)
    torch.testing.assert_close(captured(*batch), expected)


def test_capturing_restores_the_random_stream():
    """The capturing call draws what an eager call would: recording leaves torch's generator where it was."""
    module, batch = make("diagonal")
    step = gradient_program(IWAEELBO(num_particles=2).bind(module.model, module.guide), list(module.parameters()))
    pyro.set_rng_seed(11)
    eager = [step(*batch)[0] for _ in range(2)]
    pyro.set_rng_seed(11)
    captured = Captured(step, lambda: list(module.parameters()), compile=False)
    assert [float(captured(*batch)[0]) for _ in range(2)] == pytest.approx([float(v) for v in eager], rel=1e-6)


def test_a_partial_last_batch_gets_its_own_graph():
    data = load_dataset("digits")
    torch.manual_seed(0)
    module = ObjectiveModule(TinyVAE(), AnalyticKLELBO(), compile="graph")
    x = torch.bernoulli(data.x_train[:100])
    module.loss_and_grads(x[:64])
    module.loss_and_grads(x[64:])
    assert len(module.step.graphs) == 2
    torch.manual_seed(0)
    history = fit(TinyVAE(), data.x_train[:100], epochs=2, batch_size=64, compile="graph",
                  binarize_mode="dynamic", progress=False)  # 64 + 36
    assert all(math.isfinite(m["train_loss"]) for m in history)
    assert history[0]["capture_seconds"] > 0 and "capture_seconds" not in history[1]


class HostReadVAE(TinyVAE):
    """A model with data-dependent Python: it branches on a tensor's value, which no graph can record."""

    def model(self, x):
        if float(x.mean()) > 2.0:  # a host read of the data: never true for pixels in [0, 1]
            raise AssertionError("unreachable")
        return super().model(x)


def test_a_model_that_reads_the_host_trains_eagerly_after_one_line(capfd):
    data = load_dataset("digits")
    x = data.x_train[:128]
    runs = []
    for compile in ("graph", False):
        torch.manual_seed(0)
        runs.append(fit(HostReadVAE(), x, epochs=1, batch_size=64, compile=compile, binarize_mode="dynamic",
                        progress=False, seed=3))
    err = [line for line in capfd.readouterr().err.splitlines() if "pyro-vae:" in line]
    assert len(err) == 1 and "could not capture the training step into a graph (RuntimeError: It appears that " \
        "you're trying to get value out of a tracing tensor" in err[0] and err[0].endswith("running eagerly")
    assert runs[0][0]["train_loss"] == runs[1][0]["train_loss"]


def test_fit_with_a_captured_step_trains_a_user_module_exactly_as_eager():
    data = load_dataset("digits")
    histories = []
    for compile in (False, "graph"):
        torch.manual_seed(0)
        histories.append(fit(TinyVAE(), data.x_train[:256], data.x_val, epochs=2, batch_size=64, compile=compile,
                             binarize_mode="dynamic", progress=False, objective="iwae", num_particles=2,
                             estimator="dreg"))
    eager, captured = histories
    assert [m["train_loss"] for m in captured] == pytest.approx([m["train_loss"] for m in eager], rel=1e-5)
    assert [m["val_elbo"] for m in captured] == pytest.approx([m["val_elbo"] for m in eager], rel=1e-5)


@pytest.mark.parametrize("compile", ["graph", pytest.param(True, marks=[pytest.mark.slow, needs_compiler])])
def test_a_kl_warmup_trains_the_captured_step_exactly_as_eager(compile):
    """The captured step reads the annealed KL weight: beta changes every epoch of a warm-up, and a graph that
    froze the first epoch's beta would train the whole run at beta = 1/E (the bug this guards against)."""
    data = load_dataset("digits")
    histories, graphs = [], _Graphs()
    for mode in (False, compile):
        torch.manual_seed(0)
        history = fit(TinyVAE(), data.x_train[:256], data.x_val, epochs=4, batch_size=64, compile=mode,
                      binarize_mode="dynamic", progress=False, kl_warmup=3, callbacks=[graphs])
        histories.append(history)
    eager, captured = histories
    assert [m["beta"] for m in captured] == [pytest.approx(b) for b in (1 / 3, 2 / 3, 1.0, 1.0)]
    rel = 1e-5 if compile == "graph" else 1e-4  # (Inductor fuses: float rounding)
    assert [m["train_loss"] for m in captured] == pytest.approx([m["train_loss"] for m in eager], rel=rel)
    assert [m["val_elbo"] for m in captured] == pytest.approx([m["val_elbo"] for m in eager], rel=rel)
    assert graphs.seen == [1, 1, 2, 2]  # one graph for every beta < 1, one for the ELBO itself


class _Graphs(Callback):
    """Records how many graphs the captured step holds after each epoch (nothing for an eager run)."""

    def __init__(self):
        self.seen = []

    def on_epoch_end(self, state, metrics):
        step = state.objective_module.step
        if step is not None:
            self.seen.append(len(step.graphs))


@pytest.mark.parametrize("objective, option, values", [
    (lambda: AnalyticKLELBO(), "beta", (0.25, 0.75, 1.0)),
    (lambda: RenyiBound(alpha=0.2, num_particles=3), "alpha", (0.2, 0.6)),
    (lambda: IWAEELBO(num_particles=3), "estimator", ("iwae", "dreg")),
    (lambda: _WeightedIWAE(num_particles=2), "beta", (0.5, 2.0)),
])
def test_an_option_changed_between_steps_reaches_the_captured_step(objective, option, values):
    """After the objective's option changes, the captured step equals the eager one at the new value: beta of
    our ELBOs as an input of one graph, every other option (and a user objective's beta) by a new graph."""
    module, batch = make("user")
    objective = objective()
    om = ObjectiveModule(module, objective, compile="graph")
    eager_step = gradient_program(om._loss, om.params)
    for value in values:
        setattr(om.objective, option, value)
        results = []
        for fn in (eager_step, om.loss_and_grads):
            pyro.set_rng_seed(7)
            with pyro.validation_enabled(False):
                out = fn(*batch)
            results.append(list(out) if fn is eager_step else [out[0], *out[1]])
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    live = option == "beta" and isinstance(om.objective, MonteCarloELBO)  # one graph for beta < 1, one for 1
    assert len(om.step.graphs) == (2 if live else len(values))


class _WeightedIWAE(IWAEELBO):
    """A user's objective, not one of our ELBOs, with a float attribute its formula reads: the bound times beta."""
    beta = 1.0

    def bound(self, particles):
        value, surrogate = super().bound(particles)
        return self.beta * value, self.beta * surrogate


def test_resume_with_a_captured_step_is_bit_exact():
    from pyro_vae.training import TrainState  # noqa: F401  (the checkpoint is what fit's callbacks see)

    data = load_dataset("digits")
    x = data.x_train[:192]

    class Keep:
        def on_epoch_start(self, state): ...
        def on_step_end(self, state): ...
        def on_train_end(self, state, history): ...

        def on_epoch_end(self, state, metrics):
            import copy
            self.checkpoint = copy.deepcopy(state.checkpoint())

    def run(epochs, resume=None, keep=None):
        torch.manual_seed(0)
        module = TinyVAE()
        fit(module, x, epochs=epochs, batch_size=64, compile="graph", binarize_mode="dynamic", progress=False,
            resume_state=resume, callbacks=[keep] if keep else ())
        return module

    straight = run(2)
    keep = Keep()
    run(1, keep=keep)
    resumed = run(2, resume=keep.checkpoint)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.slow
@needs_compiler
def test_fit_compiled_reaches_the_eager_elbo_within_its_standard_error():
    """A user's module trained with compile=True (Inductor) against eager: held-out ELBO, K=1 per point, paired
    standard error (the draws are the same; float rounding differs)."""
    data = load_dataset("digits")
    modules = []
    for compile in (False, True):
        torch.manual_seed(0)
        modules.append(TinyVAE())
        history = fit(modules[-1], data.x_train[:512], epochs=3, batch_size=64, compile=compile,
                      binarize_mode="dynamic", progress=False)
    assert history[0]["compile_seconds"] > 0
    x = torch.bernoulli(data.x_test, generator=torch.Generator().manual_seed(0))
    values = []
    for module in modules:
        pyro.set_rng_seed(1)
        values.append(elbo(module.model, module.guide, x, num_particles=4))
    diff = values[1] - values[0]
    assert abs(float(diff.mean())) < 3 * float(diff.std()) / math.sqrt(len(diff)) + 1e-3


@pytest.mark.parametrize("compile", ["graph", pytest.param(True, marks=[pytest.mark.slow, needs_compiler])])
def test_captured_evaluation_equals_eager_for_any_model(compile):
    from linear_gaussian import LinearGaussian

    lg = LinearGaussian.random()
    x = lg.sample(6)
    module, batch = make("user")
    for model, guide, data in ((lg.model, lg.exact_guide, x), (module.model, module.guide, batch[0])):
        estimates = []
        for mode in (False, compile):
            pyro.set_rng_seed(4)
            with pyro.validation_enabled(False):
                estimates.append(log_likelihood(model, guide, data, num_samples=60, chunk_size=30, batch_size=6,
                                                progress=False, compile=mode))
        torch.testing.assert_close(estimates[0], estimates[1], rtol=1e-4, atol=1e-4)


def test_the_compile_flag_reaches_training_from_the_command_line(monkeypatch, tmp_path):
    from pyro_vae import compiling
    from pyro_vae.cli import main

    monkeypatch.setattr(compiling.Captured, "_compile", lambda self, graph, example: lambda inputs: graph(*inputs))
    run = tmp_path / "run"
    assert main(["train", "--compile", "--epochs", "1", "--z-dim", "2", "--hidden", "8", "--no-progress",
                 "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["compile"] is True
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["capture_seconds"] > 0


def test_fit_refuses_what_it_cannot_train_in_one_line():
    with pytest.raises(TypeError, match="fit trains a torch.nn.Module with Pyro programs model"):
        fit(object(), torch.rand(4, 3))

    class NoGuide(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def model(self, x):
            pass

    with pytest.raises(TypeError, match="NoGuide has no guide method"):
        fit(NoGuide(), torch.rand(4, 3))


def test_a_user_module_trains_with_fit_and_learns():
    """pyro_vae.fit on a tutorial-style module of the user's own (no input_shape, no likelihood): the held-out
    ELBO beats the untrained module's by more than 4 paired standard errors."""
    data = load_dataset("digits")
    x_test = torch.bernoulli(data.x_test, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    module = TinyVAE()
    pyro.set_rng_seed(1)
    before = elbo(module.model, module.guide, x_test, num_particles=4)
    fit(module, data.x_train, epochs=3, batch_size=64, binarize_mode="dynamic", progress=False)
    pyro.set_rng_seed(1)
    gain = elbo(module.model, module.guide, x_test, num_particles=4) - before
    assert gain.mean() > 4 * gain.std() / math.sqrt(len(gain))


@pytest.mark.slow
@needs_compiler
def test_capture_benchmark_quick(tmp_path):
    from scripts import ROOT, load_script

    bench = load_script(ROOT / "benchmarks" / "capture.py")
    threads = torch.get_num_threads()
    try:
        (row,) = bench.main(["--quick", "--out", str(tmp_path / "c.json")])
    finally:
        torch.set_num_threads(threads)
    # the floor (the matrix products and Adam alone) is below every full step, hand-written and captured
    assert row["ms"]["floor"] < min(row["ms"]["hand"], row["ms"]["captured"])
    assert row["captured"] and set(row["ms"]) >= {"hand", "svi", "traced", "captured"}
