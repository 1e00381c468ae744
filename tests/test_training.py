"""fit: options, KL warm-up, objective instances, warnings that reach the user, callbacks and resume."""
import copy

import pytest
import torch

import pyro

from pyro_vae import VAE, ConditionalVAE, PosteriorFamily, fit, load_dataset
from pyro_vae.objectives import AnalyticKLELBO, IWAEELBO, MonteCarloELBO
from pyro_vae.training import Callback

TINY = dict(epochs=1, batch_size=64, progress=False)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def tiny_vae(digits, **kwargs):
    torch.manual_seed(0)
    return VAE(digits.input_shape, z_dim=2, hidden=(16,), **kwargs)


def test_kl_warmup_anneals_a_copy_from_zero_to_the_objectives_own_beta(digits):
    objective = AnalyticKLELBO(beta=0.5)
    history = fit(tiny_vae(digits), digits.x_train[:256], objective=objective, kl_warmup=2,
                  **{**TINY, "epochs": 4})
    assert [m["beta"] for m in history] == [0.25, 0.5, 0.5, 0.5]
    assert objective.beta == 0.5  # the caller's object is left as it was


def test_options_given_with_an_objective_instance_are_an_error(digits):
    for option in ({"beta": 0.5}, {"num_particles": 5}, {"estimator": "dreg"}):
        with pytest.raises(ValueError, match=f"{next(iter(option))} given together with the objective instance"):
            fit(tiny_vae(digits), digits.x_train[:64], objective=IWAEELBO(num_particles=2), **option, **TINY)


def test_options_reach_an_objective_given_by_name(digits):
    history = fit(tiny_vae(digits), digits.x_train[:128], objective="analytic", beta=0.25, **TINY)
    assert history[0]["beta"] == 0.25
    with pytest.raises(ValueError, match="objective 'elbo' does not take estimator"):
        fit(tiny_vae(digits), digits.x_train[:64], objective="elbo", estimator="dreg", **TINY)


def test_the_monte_carlo_kl_warning_reaches_a_user_of_fit(digits):
    vae = tiny_vae(digits, guide="studentt")
    with pytest.warns(RuntimeWarning, match="no closed-form KL registered for latent site 'z'"):
        fit(vae, digits.x_train[:128], objective="analytic", **TINY)


def test_a_non_reparameterized_posterior_is_refused_by_fit(digits):
    class Discrete(PosteriorFamily):
        num_params = 4

        def forward(self, params):
            return pyro.distributions.Bernoulli(logits=params[..., :2]).to_event(1)

        def mean(self, params):
            return params[..., :2]

    vae = VAE(digits.input_shape, z_dim=2, hidden=(8,), guide=Discrete(2))
    with pytest.raises(NotImplementedError, match="no rsample"):
        fit(vae, digits.x_train[:64], **TINY)


@pytest.mark.parametrize("objective", ["elbo", "analytic", "iwae", "renyi"])
def test_every_objective_lowers_the_loss_on_digits(digits, objective):
    vae = tiny_vae(digits)
    history = fit(vae, digits.x_train, digits.x_val, objective=objective, epochs=6, batch_size=64, lr=3e-3,
                  init_output_bias="default",  # from PyTorch's init, so that the first epochs have much to learn
                  progress=False, **({"num_particles": 3} if objective in ("iwae", "renyi") else {}))
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 2.0
    assert history[-1]["val_elbo"] > history[0]["val_elbo"]


def test_pyros_trace_elbo_in_fit_equals_our_particle_elbo(digits):
    """fit maps Pyro's Trace_ELBO to MonteCarloELBO (run on the VAE's twin): the same training, bit for bit."""
    results = []
    for objective in (pyro.infer.Trace_ELBO(), MonteCarloELBO()):
        vae = tiny_vae(digits)
        fit(vae, digits.x_train[:256], objective=objective, seed=3, **{**TINY, "epochs": 2})
        results.append(torch.cat([p.detach().flatten() for p in vae.parameters()]))
    assert torch.equal(*results)


def test_callbacks_see_every_step_and_epoch_and_can_stop_training(digits):
    class Recorder(Callback):
        def __init__(self):
            self.steps, self.epochs = 0, []

        def on_step_end(self, state):
            self.steps += 1

        def on_epoch_end(self, state, metrics):
            self.epochs.append(metrics["epoch"])
            state.stop = metrics["epoch"] == 2

    recorder = Recorder()
    history = fit(tiny_vae(digits), digits.x_train[:256], callbacks=[recorder], **{**TINY, "epochs": 5})
    assert recorder.epochs == [1, 2] and len(history) == 2
    assert recorder.steps == 2 * 4  # 256 points in batches of 64


def test_a_resumed_fit_equals_an_uninterrupted_one(digits):
    class Stop(Callback):
        def __init__(self):
            self.saved = None

        def on_step_end(self, state):
            if state.global_step == 6:  # mid-epoch 2 (4 steps per epoch)
                self.saved = copy.deepcopy(state.checkpoint(epoch_done=False))  # tensors are live

    full = tiny_vae(digits)
    fit(full, digits.x_train[:256], seed=1, **{**TINY, "epochs": 3})
    stop = Stop()
    fit(tiny_vae(digits), digits.x_train[:256], seed=1, callbacks=[stop], **{**TINY, "epochs": 3})
    resumed = tiny_vae(digits)
    fit(resumed, digits.x_train[:256], seed=1, resume_state=stop.saved, **{**TINY, "epochs": 3})
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_float64_conditional_vae_trains(digits):
    vae = ConditionalVAE(digits.input_shape, num_classes=10, z_dim=2, hidden=(16,), prior="learned").double()
    history = fit(vae, (digits.x_train[:128], digits.y_train[:128]), (digits.x_val, digits.y_val), **TINY)
    assert next(vae.parameters()).dtype == torch.float64 and history[0]["val_elbo"] < 0


# ---------------------------------------------------------------------------------------------- schedules
def test_learning_rate_schedules():
    from pyro_vae.training import learning_rate

    assert learning_rate("constant", 7, 10, 1e-3) == 1e-3
    assert learning_rate("exponential", 0, 10, 1e-3, 1e-5) == pytest.approx(1e-3)
    assert learning_rate("exponential", 9, 10, 1e-3, 1e-5) == pytest.approx(1e-5)
    assert learning_rate("exponential", 9, 10, 1e-3) == pytest.approx(1e-5)  # default lr / 100
    assert learning_rate("cosine", 0, 10, 1e-3) == pytest.approx(1e-3)
    assert learning_rate("cosine", 5, 10, 1e-3, 1e-4) == pytest.approx((1e-3 + 1e-4) / 2)
    # Burda et al.: pass i of 3^i epochs at 1e-3 * 10^(-i/7), 3280 epochs in all
    burda = [learning_rate("burda", e, 3280, 1e-3) for e in range(3280)]
    for i in range(8):
        start = sum(3 ** j for j in range(i))
        assert burda[start:start + 3 ** i] == [pytest.approx(1e-3 * 10 ** (-i / 7))] * 3 ** i
    assert learning_rate("burda", 5000, 3280, 1e-3) == pytest.approx(1e-3 * 10 ** (-1))
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
        learning_rate("step", 0, 10, 1e-3)


def test_fit_follows_the_schedule_and_logs_the_rate(digits):
    history = fit(tiny_vae(digits), digits.x_train[:128], lr_schedule="exponential", lr=1e-2, lr_final=1e-4,
                  **{**TINY, "epochs": 3})
    assert [m["lr"] for m in history] == pytest.approx([1e-2, 1e-3, 1e-4])


@pytest.mark.parametrize("schedule, patience", [("burda", None), ("cosine", 2)])
def test_a_resumed_fit_is_bit_exact_under_a_schedule_and_early_stopping(digits, schedule, patience):
    class Snapshot(Callback):
        saved = None

        def on_step_end(self, state):
            if state.global_step == 13:  # mid-epoch 4 (4 steps per epoch)
                Snapshot.saved = copy.deepcopy(state.checkpoint(epoch_done=False))

    options = dict(lr_schedule=schedule, patience=patience, seed=2, **{**TINY, "epochs": 6})
    full = tiny_vae(digits)
    full_history = fit(full, digits.x_train[:256], digits.x_val, callbacks=[Snapshot()], **options)
    resumed = tiny_vae(digits)
    history = fit(resumed, digits.x_train[:256], digits.x_val, resume_state=Snapshot.saved, **options)
    assert [m["lr"] for m in history] == [m["lr"] for m in full_history[3:]]
    assert [m["epoch"] for m in history] == [m["epoch"] for m in full_history[3:]]
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_patience_stops_when_the_validation_elbo_stalls(digits):
    history = fit(tiny_vae(digits), digits.x_train[:128], digits.x_val, lr=1e-7, patience=2,
                  **{**TINY, "epochs": 50})
    best = max(range(len(history)), key=lambda i: history[i]["val_elbo"])
    assert len(history) == best + 3 and history[-1]["stopped_early"]


def test_data_mean_output_bias_starts_at_the_logit_of_the_mean_pixel(digits):
    vae = tiny_vae(digits)
    fit(vae, digits.x_train, init_output_bias="data-mean", **{**TINY, "epochs": 0})
    mean = digits.x_train.mean(0).clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(vae.decoder.net[-1].bias, torch.logit(mean).flatten())
    zero = tiny_vae(digits)
    fit(zero, digits.x_train, init_output_bias="zero", **{**TINY, "epochs": 0})
    assert torch.equal(zero.decoder.net[-1].bias, torch.zeros(64))
    first = [fit(tiny_vae(digits), digits.x_train, init_output_bias=how, **TINY)[0]["train_loss"]
             for how in ("default", "data-mean")]
    assert first[1] < first[0] - 5  # the first epoch starts from the mean image, not from p = 1/2


def test_exp_scale_parameterization(digits):
    vae = VAE(digits.input_shape, z_dim=2, hidden=(8,), guide_kwargs={"scale_param": "exp"})
    params = torch.randn(3, 4)
    torch.testing.assert_close(vae.posterior(params).base_dist.scale, params[:, 2:].exp())


def test_evaluate_the_best_or_the_last_checkpoint(tmp_path, capsys):
    import json

    from pyro_vae.cli import main

    run = tmp_path / "run"
    assert main(["train", "--epochs", "4", "--z-dim", "2", "--hidden", "8", "--lr", "0.05", "--no-progress",
                 "--out", str(run)]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best_epoch = max(metrics, key=lambda m: m["val_elbo"])["epoch"]
    for which, epoch, file in (("last", 4, "checkpoint.pt"), ("best", best_epoch, "best.pt")):
        assert main(["evaluate", str(run), "--checkpoint", which, "--num-samples", "30", "--test-points", "40"]) == 0
        result = json.loads((run / "eval.json").read_text())
        assert (result["epoch"], result["checkpoint"], result["num_test"]) == (epoch, file, 40)
        assert result["test_nll_stderr"] > 0 and result["seconds"] > 0


def test_lr_final_belongs_to_the_decaying_schedules(digits):
    for schedule in ("constant", "burda"):
        with pytest.raises(ValueError, match=f"applies to the exponential and cosine schedules, not '{schedule}'"):
            fit(tiny_vae(digits), digits.x_train[:64], lr_schedule=schedule, lr_final=1e-5, **TINY)
    with pytest.raises(ValueError, match="lr_final must be in"):
        fit(tiny_vae(digits), digits.x_train[:64], lr_schedule="exponential", lr_final=0.1, **TINY)


def _denormal_product() -> float:
    """1e-20 * 1e-20 in float32: 1e-40, a denormal, or 0 while denormals are flushed."""
    return float(torch.tensor(1e-20) * torch.tensor(1e-20))


def test_fit_flushes_denormals_while_training_and_restores_the_default(digits):
    seen = []

    class Probe(Callback):
        def on_step_end(self, state):
            seen.append(_denormal_product())

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    assert _denormal_product() > 0
    fit(tiny_vae(digits), digits.x_train[:128], callbacks=[Probe()], **TINY)
    assert seen and all(v == 0.0 for v in seen)
    assert _denormal_product() > 0  # back to torch's default after training
