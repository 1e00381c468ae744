"""Your own Pyro model, first-class (docs/own-model.md): ``pyro-vae train --model FILE.py:CLASS``, runs that keep
the model's code (and need --trust-code to load it), evaluation, samples and inference gaps for any model/guide.

The closed-form tests of the inference-gap analysis (tests/test_analysis.py) run again on the linear-Gaussian
model written as a user's module file (tests/user_linear_gaussian.py): the full-covariance local optimum is the
exact posterior (gap 0), the diagonal one has the mean-field gap."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import pyro

from linear_gaussian import LinearGaussian
from pyro_vae import analysis, evaluation, load_run, user_model
from pyro_vae.cli import main

HERE = Path(__file__).resolve().parent
DTYPE = torch.float64

TINY_MODEL = '''
import torch
from torch import nn
import pyro
import pyro.distributions as dist


class Tiny(nn.Module):
    def __init__(self, input_shape=(1, 8, 8), z_dim=2, hidden=16):
        super().__init__()
        d = 1
        for s in input_shape:
            d *= s
        self.z_dim = z_dim
        self.encoder = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Tanh(), nn.Linear(hidden, d))

    def model(self, x=None, batch_size=None):
        pyro.module("decoder", self.decoder)
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros(n, self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1),
                        obs=None if x is None else x.reshape(n, -1))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        loc, s = self.encoder(x.reshape(x.shape[0], -1)).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(s) + 1e-3).to_event(1))


class NoGuide(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def model(self, x=None, batch_size=None):
        pass
'''

TRAIN = ["--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--binarize", "dynamic", "--no-progress"]


def _run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A run of a user's model file trained from the command line, the file then deleted."""
    tmp = tmp_path_factory.mktemp("own")
    source = tmp / "my_vae.py"
    source.write_text(TINY_MODEL)
    run = tmp / "run"
    assert main(["train", "--model", f"{source}:Tiny", "--model-kwargs", '{"hidden": 8}', *TRAIN,
                 "--out", str(run)]) == 0
    source.unlink()
    return run


# ---------------------------------------------------------------------------------------------- runs and the CLI
def test_the_run_keeps_the_model_source_and_its_hash(own_run):
    config = json.loads((own_run / "config.json").read_text())
    record = config["user_model"]
    assert record["class"] == "Tiny" and record["kwargs"] == {"hidden": 8} and record["input_shape"] == [1, 8, 8]
    copy = (own_run / user_model.MODEL_SOURCE).read_bytes()
    assert copy == TINY_MODEL.encode() and record["sha256"] == user_model.sha256(copy)
    assert {"checkpoint.pt", "metrics.jsonl", "samples.png", "reconstructions.png", "latent.png"} <= \
        {p.name for p in own_run.iterdir()}


def test_evaluate_sample_gaps_and_resume_from_the_runs_copy(own_run, tmp_path, capsys):
    """The original file is gone: every command loads the run's copy, with --trust-code."""
    code, out, err = _run_cli(["evaluate", str(own_run), "--trust-code", "--num-samples", "200",
                               "--test-points", "60"], capsys)
    assert code == 0, err
    result = json.loads((own_run / "eval.json").read_text())
    assert result["test_nll"] < -result["test_elbo"]  # importance sampling tightens the bound
    assert result["latent_sites"]["z"]["dims"] == 2 and len(result["kl_per_dimension"]) == 2
    assert 0 <= result["active_units"] <= 2
    code, out, err = _run_cli(["sample", str(own_run), "--trust-code", "-n", "16", "--out",
                               str(tmp_path / "s.png")], capsys)
    assert code == 0 and (tmp_path / "s.png").stat().st_size > 0, err
    code, out, err = _run_cli(["gaps", str(own_run), "--trust-code", "--steps", "10", "--test-points", "12",
                               "--num-samples", "50", "--elbo-particles", "10", "--out", str(tmp_path / "g")],
                              capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "g" / "gaps.json").read_text())
    assert set(report["families"]) == {"diagonal", "cholesky"} and report["encoder_family"] == "Tiny.guide"
    resumed = tmp_path / "resumed"
    shutil.copytree(own_run, resumed)
    code, out, err = _run_cli(["train", "--resume", str(resumed), "--epochs", "2", "--trust-code",
                               "--no-progress"], capsys)
    assert code == 0, err
    assert [m["epoch"] for m in load_run(resumed, trust_code=True).metrics] == [1, 2]


@pytest.mark.parametrize("command", [["evaluate"], ["sample"], ["plot"], ["gaps"], ["train", "--resume"]])
def test_without_trust_code_loading_is_refused_in_one_line(own_run, capsys, command):
    argv = command + [str(own_run)] + (["--no-progress"] if command[0] == "train" else [])
    before = sorted(p.name for p in own_run.iterdir())
    code, _, err = _run_cli(argv, capsys)
    line = _one_line_error(err)
    assert code == 2 and "--trust-code" in line and str(own_run / "model.py") in line
    assert sorted(p.name for p in own_run.iterdir()) == before


def test_load_run_needs_trust_code_in_python(own_run):
    with pytest.raises(user_model.UntrustedCodeError, match="trust_code=True"):
        load_run(own_run)
    run = load_run(own_run, trust_code=True)
    assert type(run.vae).__name__ == "Tiny"


def test_an_edited_copy_is_refused(own_run, tmp_path, capsys):
    edited = tmp_path / "edited"
    shutil.copytree(own_run, edited)
    (edited / "model.py").write_text(TINY_MODEL + "\n# edited\n")
    code, _, err = _run_cli(["evaluate", str(edited), "--trust-code"], capsys)
    assert code == 2 and "was changed after training" in _one_line_error(err)


@pytest.mark.parametrize("spec, kwargs, message", [
    ("missing.py:Tiny", None, "no such file"),
    ("{file}:Nope", None, "has no class Nope"),
    ("{file}:NoGuide", None, "has no guide method"),
    ("{file}:Tiny", '{"z_dimm": 3}', "does not take z_dimm"),
    ("{file}", None, "takes FILE.py:CLASS"),
])
def test_bad_model_specs_exit_2_in_one_line_and_leave_nothing(tmp_path, capsys, monkeypatch, spec, kwargs,
                                                              message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text(TINY_MODEL)
    argv = ["train", "--model", spec.format(file="m.py"), *TRAIN, "--out", "run"]
    argv += ["--model-kwargs", kwargs] if kwargs else []
    code, _, err = _run_cli(argv, capsys)
    assert code == 2 and message in _one_line_error(err)
    assert not (tmp_path / "run").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.py"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "m.py:Tiny", "--z-dim", "3"], "--z-dim builds the built-in VAE"),
    (["--model-kwargs", "{}"], "--model-kwargs applies to --model"),
    (["--model", "m.py:Tiny", "--model-kwargs", "[1]"], "expected a JSON object"),
])
def test_model_options_that_do_not_fit(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text(TINY_MODEL)
    code, _, err = _run_cli(["train", *argv, *TRAIN, "--out", "run"], capsys)
    assert code == 2 and message in _one_line_error(err) and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- evaluation, samples
@pytest.fixture(scope="module")
def tiny():
    pyro.set_rng_seed(0)
    cls = user_model.load_class(HERE / "tiny_vae.py", "TinyVAE")
    return user_model.build(cls, {}), torch.bernoulli(torch.rand(20, 1, 8, 8))


def test_reconstruction_is_the_observed_means_at_the_guides_mean(tiny):
    vae, x = tiny
    r = evaluation.reconstruct(vae.model, vae.guide, x)
    loc = vae.encoder(x.reshape(20, -1)).chunk(2, -1)[0]
    assert r.shape == x.shape
    assert torch.allclose(r, torch.sigmoid(vae.decoder(loc)).reshape(x.shape), atol=1e-6)


def test_a_model_that_cannot_generate_is_one_line(tiny):
    vae, x = tiny  # TinyVAE.model(x) needs x: it cannot be called as model(None, batch_size=n)
    with pytest.raises(ValueError, match=r"model\(None, batch_size=n\)") as info:
        evaluation.sample_model(vae.model, 4, "x")
    assert "\n" not in str(info.value)


def test_latent_site_statistics_agree_with_the_vae_closed_forms():
    """For the built-in VAE (diagonal q, N(0, I) prior) the per-site statistics of the traces equal its own."""
    from pyro_vae import VAE

    pyro.set_rng_seed(1)
    vae = VAE(input_shape=(1, 8, 8), z_dim=3, hidden=(16,)).eval()
    x = torch.bernoulli(torch.rand(30, 1, 8, 8))
    stats = evaluation.latent_site_statistics(vae.model, vae.guide, x)["z"]
    assert torch.allclose(torch.tensor(stats["kl_per_dimension"]), evaluation.kl_per_dimension(vae, x), atol=1e-5)
    assert torch.allclose(torch.tensor(stats["activity"]), evaluation.latent_activity(vae, x), atol=1e-5)


# ---------------------------------------------------------------------------------------------- inference gaps
@pytest.fixture(scope="module")
def lg_module():
    """The linear-Gaussian model as a user's own module, loaded from its file as ``--model`` would."""
    cls = user_model.load_class(HERE / "user_linear_gaussian.py", "LinearGaussianVAE")
    module = user_model.build(cls, {}, input_shape=(4,)).eval()
    lg = LinearGaussian(module.W.detach().clone(), module.b.detach().clone(), module.sigma)
    return module, lg


def _closed_form_elbo(lg, x, q) -> torch.Tensor:
    cov = q.covariance_matrix if hasattr(q, "covariance_matrix") else torch.diag_embed(q.variance)
    return lg.elbo(x, q.mean, cov).detach()


def _mean_field_gap(lg) -> float:
    _, S = lg.posterior(torch.zeros(1, lg.D, dtype=DTYPE))
    return float(0.5 * (torch.linalg.inv(S).diagonal().log().sum() + torch.logdet(S)))


def test_own_module_local_cholesky_optimum_is_the_exact_posterior(lg_module):
    module, lg = lg_module
    x = lg.sample(16, seed=3)
    pyro.set_rng_seed(0)
    local = analysis.refine_sites(module.model, module.guide, x, 200, family="cholesky", num_particles=16, lr=0.2)
    gap = lg.log_marginal(x) - _closed_form_elbo(lg, x, local.posterior())
    assert gap.min() > -1e-9 and gap.mean() < 0.015 and gap.max() < 0.05
    m, S = lg.posterior(x)
    assert torch.allclose(local.posterior().mean, m, atol=0.1)
    assert torch.allclose(local.posterior().covariance_matrix.mean(0), S, atol=0.05)


def test_own_module_local_diagonal_optimum_has_the_mean_field_gap(lg_module):
    module, lg = lg_module
    x = lg.sample(16, seed=3)
    pyro.set_rng_seed(0)
    start = analysis.local_site_posterior(module.model, module.guide, x, "diagonal").posterior()
    loc, log_scale = module.encoder(x).chunk(2, -1)  # initialised at the guide's marginal moments
    assert torch.allclose(start.mean, loc) and torch.allclose(start.stddev, log_scale.exp())
    local = analysis.refine_sites(module.model, module.guide, x, 150, family="diagonal", num_particles=8, lr=0.1)
    q = local.posterior()
    gap = lg.log_marginal(x) - _closed_form_elbo(lg, x, q)
    assert _mean_field_gap(lg) > 0.5
    assert abs(float(gap.mean()) - _mean_field_gap(lg)) < 0.02
    m, S = lg.posterior(x)
    assert torch.allclose(q.mean, m, atol=0.05)
    assert torch.allclose(q.variance.mean(0), 1 / torch.linalg.inv(S).diagonal(), rtol=0.05)
    assert all(not p.requires_grad or p.grad is None for p in module.parameters())  # the model was frozen


@pytest.mark.slow
def test_own_module_inference_gaps_match_the_closed_forms(lg_module):
    """The report's estimated gaps equal the closed-form ones within 4 standard errors (plus the optimisation's
    0.03), as tests/test_analysis.py checks for the built-in VAE."""
    module, lg = lg_module
    x = lg.sample(32, seed=5)
    pyro.set_rng_seed(0)
    report = analysis.model_inference_gaps(module.model, module.guide, x, steps=300, num_samples=2000,
                                           num_particles=8, elbo_particles=400, lr=0.05)
    exact = lg.log_marginal(x)
    log_px = torch.tensor(report["per_point"]["log_px"], dtype=DTYPE)
    assert abs(float((log_px - exact).mean())) < 4 * float((log_px - exact).std()) / math.sqrt(32) + 1e-3
    for name, expected in (("cholesky", 0.0), ("diagonal", _mean_field_gap(lg))):
        gap = report["families"][name]["approximation_gap"]
        assert abs(gap["mean"] - expected) < 4 * gap["stderr"] + 0.03, (name, gap)
        assert report["families"][name]["amortization_gap"]["mean"] > 0
    assert report["proposal"] == "cholesky"


def test_own_module_gap_report(lg_module, tmp_path):
    module, lg = lg_module
    x = lg.sample(16, seed=3)
    report = analysis.model_inference_gaps(module.model, module.guide, x, steps=25, num_samples=100,
                                           elbo_particles=30, lr=0.1)
    fam = report["families"]
    assert fam["cholesky"]["approximation_gap"]["mean"] < fam["diagonal"]["approximation_gap"]["mean"]
    assert fam["diagonal"]["amortization_gap"]["mean"] > 0
    names = sorted(p.name for p in analysis.write_gaps(report, tmp_path))
    assert names == ["gaps-cholesky.png", "gaps-convergence.png", "gaps-diagonal.png", "gaps-summary.png",
                     "gaps.json", "gaps.md"]
