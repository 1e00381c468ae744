"""Inference gaps and test-time refinement against closed forms on the linear-Gaussian model.

The VAE below *is* the linear-Gaussian model of tests/linear_gaussian.py (decoder x = W z + b, fixed sigma), its
posterior N(m(x), S) is correlated, and its encoder is a linear map to a diagonal Gaussian. So every quantity of
the analysis has a closed form: log p(x), the ELBO of any Gaussian q, the locally optimal full-covariance q
(the exact posterior: approximation gap 0) and the locally optimal diagonal q (mean m, precisions diag(S^-1):
approximation gap KL = 1/2 [sum_i log (S^-1)_ii + log det S], the same for every x).
"""
import copy
import json
import math

import pytest
import torch

import pyro

from linear_gaussian import LinearGaussian
from pyro_vae import ConditionalVAE, VAE, analysis
from pyro_vae.cli import main
from pyro_vae.guides import POSTERIORS, PosteriorFamily

DTYPE = torch.float64
W = torch.tensor([[1.0, 0.9], [0.8, 1.0], [1.0, 1.1], [0.5, 0.6]], dtype=DTYPE)
LG = LinearGaussian(W, torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=DTYPE), 0.7)


def mean_field_gap(lg: LinearGaussian) -> float:
    _, S = lg.posterior(torch.zeros(1, lg.D, dtype=DTYPE))
    return float(0.5 * (torch.linalg.inv(S).diagonal().log().sum() + torch.logdet(S)))


def linear_gaussian_vae(lg=LG, shift=0.3, widen=1.5, guide="diagonal") -> VAE:
    """A VAE whose model is ``lg`` and whose linear encoder gives q(z|x) = N(m(x) + shift s, diag (widen s)^2),
    s = sqrt(diag S): the exact posterior's marginals, shifted and widened (a suboptimal amortized q)."""
    _, S = lg.posterior(torch.zeros(1, lg.D, dtype=DTYPE))
    A = S @ lg.W.T / lg.sigma ** 2  # m(x) = A (x - b)
    sd = S.diagonal().sqrt()
    decoder, encoder = torch.nn.Linear(lg.d, lg.D), torch.nn.Linear(lg.D, 2 * lg.d)
    vae = VAE(input_shape=(lg.D,), z_dim=lg.d, likelihood="gaussian", sigma=lg.sigma, encoder=encoder,
              decoder=decoder, guide=guide).to(DTYPE)
    with torch.no_grad():
        decoder.weight.copy_(lg.W)
        decoder.bias.copy_(lg.b)
        encoder.weight.zero_()
        encoder.weight[: lg.d] = A
        encoder.bias[: lg.d] = -(A @ lg.b) + shift * sd
        encoder.bias[lg.d:] = vae.posterior.raw_scale(widen * sd)
    return vae.eval()


def gaussian_elbo(lg, x, q) -> torch.Tensor:
    """Closed-form ELBO per point of a Gaussian q (diagonal or full covariance)."""
    cov = q.covariance_matrix if hasattr(q, "covariance_matrix") else torch.diag_embed(q.variance)
    return lg.elbo(x, q.mean, cov).detach()


@pytest.fixture
def x():
    return LG.sample(16, seed=3)


# ---------------------------------------------------------------------------------------------- local optima
def test_local_cholesky_optimum_is_the_exact_posterior(x):
    """The full-covariance family contains the posterior: its local optimum has approximation gap 0."""
    vae = linear_gaussian_vae()
    local = vae.refine(x, steps=500, family="cholesky", num_particles=8, lr=0.1)
    gap = LG.log_marginal(x) - gaussian_elbo(LG, x, local.posterior())
    assert gap.min() > -1e-9  # an ELBO never exceeds log p(x)
    assert gap.mean() < 0.01 and gap.max() < 0.05
    m, S = LG.posterior(x)
    q = local.posterior()
    assert torch.allclose(q.mean, m, atol=0.1)
    assert torch.allclose(q.covariance_matrix.mean(0), S, atol=0.05)


def test_local_diagonal_optimum_has_the_mean_field_gap(x):
    """The best factorized Gaussian has mean m and precisions diag(S^-1); its gap is the mean-field KL."""
    vae = linear_gaussian_vae()
    local = vae.refine(x, steps=300, family="diagonal", num_particles=8, lr=0.05)
    q = local.posterior()
    gap = LG.log_marginal(x) - gaussian_elbo(LG, x, q)
    assert mean_field_gap(LG) > 0.5  # a strongly correlated posterior: the family matters
    assert abs(float(gap.mean()) - mean_field_gap(LG)) < 0.02
    m, S = LG.posterior(x)
    assert torch.allclose(q.mean, m, atol=0.05)
    assert torch.allclose(q.variance.mean(0), 1 / torch.linalg.inv(S).diagonal(), rtol=0.05)


def test_amortization_gaps_are_non_negative(x):
    """Started at the encoder's q, the local optimum of every family is at least as good, point by point."""
    vae = linear_gaussian_vae()
    amortized = gaussian_elbo(LG, x, vae.encode(x))
    for family in ("diagonal", "cholesky", "lowrank"):
        local = vae.refine(x, steps=150, family=family, num_particles=4, lr=0.05)
        assert (gaussian_elbo(LG, x, local.posterior()) - amortized).min() > 0, family


def test_refinement_never_lowers_the_elbo_in_expectation(x):
    """More SVI steps, a better ELBO, for every seed. At the optimum itself (an encoder that outputs the
    mean-field optimum) there is nothing to gain: refinement stays within the noise of its stochastic gradients
    (a few thousandths of a nat, averaged over seeds), far below what it gains from a slightly worse start."""
    vae = linear_gaussian_vae()
    for seed in range(2):
        means = []
        for steps in (0, 10, 50, 150):
            pyro.set_rng_seed(seed)
            means.append(float(gaussian_elbo(LG, x, vae.refine(x, steps=steps, lr=0.05).posterior()).mean()))
        assert means == sorted(means) and means[-1] - means[0] > 1.0
    _, S = LG.posterior(x)
    mean_field_sd = torch.linalg.inv(S).diagonal().rsqrt()
    changes = {}
    for shift in (0.0, 0.2):  # the optimum, and a start 0.2 standard deviations off
        start = linear_gaussian_vae(shift=shift, widen=1.0)
        with torch.no_grad():
            start.encoder.bias[LG.d:] = start.posterior.raw_scale(mean_field_sd)
        before = gaussian_elbo(LG, x, start.encode(x)).mean()
        changes[shift] = []
        for seed in range(4):
            pyro.set_rng_seed(seed)
            after = gaussian_elbo(LG, x, start.refine(x, steps=100, num_particles=4).posterior()).mean()
            changes[shift].append(float(after - before))
    assert abs(sum(changes[0.0]) / 4) < 0.01
    assert min(changes[0.2]) > 5 * abs(sum(changes[0.0]) / 4)


# ---------------------------------------------------------------------------------------------- the report
@pytest.mark.slow
def test_inference_gaps_match_the_closed_forms():
    """The estimated gaps equal the closed-form ones within 4 standard errors (plus the optimisation's 0.03)."""
    x = LG.sample(32, seed=5)
    vae = linear_gaussian_vae()
    pyro.set_rng_seed(0)
    report = analysis.inference_gaps(vae, x, families=("diagonal", "cholesky", "flow"), steps=300,
                                     num_samples=2000, num_particles=8, elbo_particles=400, lr=0.05)
    exact = LG.log_marginal(x)
    log_px = torch.tensor(report["per_point"]["log_px"], dtype=DTYPE)
    assert abs(float((log_px - exact).mean())) < 4 * float((log_px - exact).std()) / math.sqrt(32) + 1e-3
    amortized = torch.tensor(report["per_point"]["amortized_elbo"], dtype=DTYPE)
    closed = gaussian_elbo(LG, x, vae.encode(x))
    assert abs(float((amortized - closed).mean())) < 4 * float((amortized - closed).std()) / math.sqrt(32)
    families = report["families"]
    for name, expected in (("cholesky", 0.0), ("diagonal", mean_field_gap(LG)), ("flow", None)):
        gap = families[name]["approximation_gap"]
        assert gap["mean"] > -4 * gap["stderr"], name
        if expected is not None:
            assert abs(gap["mean"] - expected) < 4 * gap["stderr"] + 0.03, (name, gap)
        assert families[name]["amortization_gap"]["mean"] > 0
        assert abs(families[name]["convergence"]["final_gain"]["mean"]) < 0.05  # converged
    assert report["proposal"] in ("cholesky", "flow")
    inference = report["inference_gap"]["mean"]
    diag = families["diagonal"]
    assert abs(diag["approximation_gap"]["mean"] + diag["amortization_gap"]["mean"] - inference) < 1e-9


def test_inference_gaps_report_and_files(tmp_path, x):
    vae = linear_gaussian_vae()
    report = analysis.inference_gaps(vae, x, families=("diagonal", "cholesky"), steps=60, num_samples=200,
                                     elbo_particles=50, lr=0.05)
    assert report["encoder_family"] == "diagonal" and report["num_points"] == 16
    assert report["families"]["cholesky"]["approximation_gap"]["mean"] < \
        report["families"]["diagonal"]["approximation_gap"]["mean"]
    assert len(report["families"]["diagonal"]["convergence"]["objective"]) == 60
    paths = analysis.write_gaps(report, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == ["gaps-cholesky.png", "gaps-convergence.png", "gaps-diagonal.png", "gaps-summary.png",
                     "gaps.json", "gaps.md"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert json.loads((tmp_path / "out" / "gaps.json").read_text())["families"].keys() == {"diagonal", "cholesky"}
    assert "approximation gap" in (tmp_path / "out" / "gaps.md").read_text()
    with pytest.raises(ValueError, match="unknown posterior family"):
        analysis.inference_gaps(vae, x, families=("nope",))
    with pytest.raises(ValueError, match="distinct"):
        analysis.inference_gaps(vae, x, families=("flow", "iaf"))


def test_refined_proposal_lowers_the_variance_of_log_likelihood(x):
    vae = linear_gaussian_vae(shift=1.0, widen=0.8)  # an off-centre, too narrow proposal
    pyro.set_rng_seed(0)
    result = analysis.refined_evaluation(vae, x, steps=150, num_samples=400, elbo_particles=50, batch_size=8,
                                         lr=0.05)
    exact = LG.log_marginal(x)
    assert result["refined_is_stderr"] < 0.8 * result["amortized_is_stderr"]
    assert result["refined_ess"] > result["amortized_ess"]
    assert abs(-result["refined_nll"] - float(exact.mean())) < 4 * result["refined_nll_stderr"]
    assert float(gaussian_elbo(LG, x, vae.encode(x)).mean()) < result["refined_elbo"] < -result["refined_nll"]


def test_importance_sampling_standard_error_is_calibrated(x):
    """The delta-method standard error of log p(x) matches the spread of repeated estimates."""
    vae = linear_gaussian_vae(shift=0.5, widen=2.0)
    estimates = torch.stack([analysis.importance_sampling(vae.model, vae.guide, (x,), 50)["log_px"]
                             for _ in range(40)])
    predicted = analysis.importance_sampling(vae.model, vae.guide, (x,), 20000)["stderr"] * math.sqrt(20000 / 50)
    ratio = estimates.std(0).mean() / predicted.mean()
    assert 0.7 < float(ratio) < 1.3


# ---------------------------------------------------------------------------------------------- the local posterior
@pytest.mark.parametrize("family", ["diagonal", "cholesky", "lowrank", "flow", "laplace", "studentt"])
def test_local_posterior_starts_at_the_encoders_posterior(x, family):
    """Another family starts at its member with the encoder's means and marginal standard deviations."""
    vae = linear_gaussian_vae()
    q0, q = vae.encode(x), vae.local_posterior(x, family=family).posterior()
    if family in ("diagonal", "cholesky", "flow"):  # exactly the encoder's diagonal Gaussian
        z = q.sample((5,))
        assert torch.allclose(q.log_prob(z), q0.log_prob(z), atol=1e-8)
    else:
        mean, std = q.mean, q.variance.sqrt()
        assert torch.allclose(mean, q0.mean, atol=1e-8)
        assert torch.allclose(std, q0.stddev, rtol=0.02 if family == "lowrank" else 1e-6)


def test_iaf_encoder_is_refined_with_its_own_flow(x):
    """A VAE trained with an IAF keeps its flow for its own family; another family starts at the IAF's
    moments (estimated by sampling)."""
    pyro.set_rng_seed(0)
    vae = VAE(input_shape=(LG.D,), z_dim=LG.d, likelihood="gaussian", sigma=LG.sigma, guide="iaf",
              hidden=(8,)).to(DTYPE).eval()
    own = vae.local_posterior(x)
    z = own.posterior().sample()
    assert torch.allclose(own.posterior().log_prob(z), vae.encode(x).log_prob(z), atol=1e-8)
    assert own.family is not vae.posterior  # a copy: refining never moves the VAE's flow
    chol = vae.local_posterior(x, family="cholesky").posterior()
    zs = vae.encode(x).sample((4000,))
    assert torch.allclose(chol.mean, zs.mean(0), atol=0.1)


def test_refine_leaves_the_vae_and_the_param_store_untouched(x):
    vae = linear_gaussian_vae()
    pyro.param("unrelated", torch.ones(2))
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    vae.encoder.weight.requires_grad_(False)
    local = vae.refine(x, steps=5, family="flow", num_particles=2)
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert not vae.encoder.weight.requires_grad and vae.decoder.weight.requires_grad
    assert all(p.grad is None for p in vae.parameters())
    assert set(pyro.get_param_store().keys()) == {"unrelated"}
    assert len(local.trace) == 5 and local.params.shape == (16, vae.posterior.num_params + LG.d)
    with pytest.raises(ValueError, match="holds 16 data points"):
        pyro.poutine.trace(local.guide).get_trace(x[:3])


class ExpDiagonal(PosteriorFamily):
    """A user's family: a diagonal Gaussian with sigma = exp(raw), written from scratch."""

    def __init__(self, z_dim):
        super().__init__(z_dim)
        self.num_params = 2 * z_dim

    def forward(self, params):
        loc, raw = params.split(self.z_dim, -1)
        return pyro.distributions.Normal(loc, raw.exp()).to_event(1)

    def init_local(self, loc, scale):
        return torch.cat([loc, scale.log()], -1)


def test_a_users_family_gets_the_analysis_for_free(x):
    vae = linear_gaussian_vae()
    user = VAE(input_shape=(LG.D,), z_dim=LG.d, likelihood="gaussian", sigma=LG.sigma, guide=ExpDiagonal(LG.d),
               encoder=vae.encoder, decoder=vae.decoder).to(DTYPE).eval()
    report = analysis.inference_gaps(user, x, families=(None, "cholesky"), steps=30, num_samples=100,
                                     elbo_particles=20, lr=0.05)
    assert report["encoder_family"] == "ExpDiagonal" and set(report["families"]) == {"ExpDiagonal", "cholesky"}
    assert all(math.isfinite(f["approximation_gap"]["mean"]) for f in report["families"].values())
    local = vae.refine(x, steps=30, family=ExpDiagonal(LG.d), lr=0.05)  # as the target family too
    assert gaussian_elbo(LG, x, local.posterior()).mean() > gaussian_elbo(LG, x, vae.encode(x)).mean()


def test_conditional_vae_is_refined_with_its_condition():
    pyro.set_rng_seed(0)
    cvae = ConditionalVAE(input_shape=(1, 8, 8), num_classes=10, z_dim=2, hidden=(16,)).eval()
    x, y = torch.bernoulli(torch.full((6, 1, 8, 8), 0.3)), torch.arange(6)
    report = analysis.inference_gaps(cvae, x, y, families=("diagonal",), steps=20, num_samples=50,
                                     elbo_particles=10)
    gap = report["families"]["diagonal"]["amortization_gap"]
    assert math.isfinite(gap["mean"]) and gap["mean"] > -4 * gap["stderr"]
    result = analysis.refined_evaluation(cvae, x, y, steps=10, num_samples=20, batch_size=4)
    assert math.isfinite(result["refined_nll"])


# ---------------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gaps") / "run"
    assert main(["train", "--epochs", "1", "--z-dim", "2", "--hidden", "16", "--no-progress", "--out", str(run)]) == 0
    return run


def test_gaps_and_refined_evaluate_from_the_command_line(digits_run, tmp_path, capsys):
    out = tmp_path / "gaps"
    assert main(["gaps", str(digits_run), "--steps", "20", "--test-points", "12", "--num-samples", "30",
                 "--elbo-particles", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "approximation gap" in printed and str(out / "gaps.json") in printed
    report = json.loads((out / "gaps.json").read_text())
    assert set(report["families"]) == {"diagonal", "cholesky", "flow"} and report["num_points"] == 12
    assert report["epoch"] == 1 and report["checkpoint"] == "checkpoint.pt"
    for name in ("gaps.md", "gaps-diagonal.png", "gaps-cholesky.png", "gaps-flow.png", "gaps-convergence.png"):
        assert (out / name).stat().st_size > 0
    assert main(["evaluate", str(digits_run), "--num-samples", "30", "--test-points", "20",
                 "--refine-steps", "10"]) == 0
    result = json.loads((digits_run / "eval.json").read_text())
    assert result["refine_steps"] == 10 and result["refined_nll"] > 0
    assert result["refined_elbo"] > result["test_elbo"] - 1.0
    assert {"refined_is_stderr", "amortized_is_stderr", "refined_ess", "amortized_ess"} <= set(result)


@pytest.mark.parametrize("argv, message", [
    (["--families", "diagonal,nope"], "unknown family nope"),
    (["--families", "flow,iaf"], "lists a family twice"),
    (["--steps", "0"], "expected a positive integer"),
    (["--test-points", "x"], "expected a positive integer"),
])
def test_gaps_bad_input_exits_2_with_one_line(digits_run, capsys, argv, message):
    capsys.readouterr()
    try:
        code = main(["gaps", str(digits_run), *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (digits_run / "gaps.json").exists()


def test_gaps_of_a_missing_run_exits_2(tmp_path, capsys):
    assert main(["gaps", str(tmp_path / "missing")]) == 2
    assert "not a pyro-vae run directory" in capsys.readouterr().err


def test_flow_is_the_iaf_family():
    assert POSTERIORS["iaf"].__name__ == "IAFNormal"
    vae = linear_gaussian_vae()
    assert analysis.family_name(vae, "iaf") == analysis.family_name(vae, "flow") == "flow"
    assert analysis.family_name(vae, None) == "diagonal"


def test_learning_report_pairs_the_two_models_on_the_same_points_and_noise():
    """A model against itself gains exactly nothing (same points, same noise); against a copy with a worse decoder
    bias, the trained model's gain is the paired difference of the two per-point bounds."""
    pyro.set_rng_seed(0)
    vae = VAE((1, 4, 4), z_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((30, 1, 4, 4), 0.3), generator=torch.Generator().manual_seed(0))
    same = analysis.learning_report(vae, vae, x, num_samples=20)
    assert same["learned"] == {"mean": 0.0, "stderr": 0.0} and same["learned_log_px"] == {"mean": 0.0, "stderr": 0.0}
    assert same["test_nll"] == same["untrained_nll"] and same["test_nll"] > 0
    worse = copy.deepcopy(vae)
    with torch.no_grad():
        worse.decoder.net[-1].bias.add_(3.0)  # every pixel's logit off by 3: a much worse fit to x
    report = analysis.learning_report(vae, worse, x, num_samples=20)
    assert report["learned_log_px"]["mean"] > 3 * report["learned_log_px"]["stderr"] > 0
    assert report["learned_log_px"]["mean"] == pytest.approx(report["untrained_nll"] - report["test_nll"], rel=1e-6)
