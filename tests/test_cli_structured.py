"""The command line for structured VAEs: ``pyro-vae train --hierarchy D1,D2 --inference bottom-up|top-down`` and
``--prior standard|mog|vamp|flow --prior-components K``; their runs reload into the right class and every command
(evaluate, sample, plot, gaps, --resume) works on them."""
import json
import math

import pytest
import torch
from PIL import Image

from pyro_vae import HierarchicalVAE, VAE, load_run
from pyro_vae import config as config_module
from pyro_vae import hierarchical, priors
from pyro_vae.cli import _config, _given, build_parser, main
from pyro_vae.config import RunConfig
from pyro_vae.runs import CONFIG, _read_config, build_vae, load_checkpoint

TINY = ["--epochs", "1", "--hidden", "16", "--no-progress"]
FILES = ["config.json", "metrics.jsonl", "checkpoint.pt", "samples.png", "reconstructions.png", "latent.png",
         "curves.png"]
PRIOR_CLASSES = {"standard": type(None), "mog": priors.MixturePrior, "vamp": priors.VampPrior,
                 "flow": priors.FlowPrior}


def _exit_code(argv):
    """main()'s return code, or argparse's SystemExit code for a usage error."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _train(run, *options):
    assert main(["train", *TINY, *options, "--out", str(run)]) == 0
    for f in FILES:
        assert (run / f).stat().st_size > 0, f
    return run


def _prior_options(prior: str) -> list:
    return ["--prior", prior] + (["--prior-components", "3"] if prior in ("mog", "vamp") else [])


def _check_reload(run, cls, prior: str, hierarchy=None, inference="bottom-up"):
    """config.json holds the options, round-trips, and reloads into ``cls`` with the prior, K and layers asked
    for; the reloaded weights are the checkpoint's."""
    saved = json.loads((run / CONFIG).read_text())
    assert saved["prior"] == prior and saved["inference"] == inference
    assert saved["hierarchy"] == (None if hierarchy is None else list(hierarchy))
    assert saved["prior_components"] == (3 if prior in ("mog", "vamp") else None)
    loaded = load_run(run)
    assert loaded.config == RunConfig.from_dict(saved)
    assert type(loaded.vae) is cls and isinstance(loaded.vae.learned_prior, PRIOR_CLASSES[prior])
    if prior == "vamp":
        assert loaded.vae.learned_prior.pseudo_inputs.shape == (3, 1, 8, 8)
    if prior == "mog":
        assert loaded.vae.learned_prior.logits.shape == (3,)
    if hierarchy is not None:
        assert loaded.vae.latent_sizes == tuple(hierarchy) and loaded.vae.inference == inference
        assert loaded.vae.deterministic == ((16,),) * len(hierarchy)
    state = load_checkpoint(run / "checkpoint.pt")["model"]
    assert all(torch.equal(v, state[k]) for k, v in loaded.vae.state_dict().items())
    return loaded


def _check_evaluate(run, capsys, sites: dict | None) -> dict:
    """``pyro-vae evaluate``: eval.json with one entry per latent site (``sites``: dims; None: the single-layer
    VAE with N(0, I), whose closed forms give no per-site entries), finite bounds, NLL <= -ELBO."""
    capsys.readouterr()
    assert main(["evaluate", str(run), "--num-samples", "20", "--test-points", "40"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result == json.loads(capsys.readouterr().out)
    if sites is None:
        assert "latent_sites" not in result and len(result["kl_per_dimension"]) == 3
    else:
        assert {name: s["dims"] for name, s in result["latent_sites"].items()} == sites
        assert result["active_units"] == sum(s["active_units"] for s in result["latent_sites"].values())
    assert math.isfinite(result["test_elbo"]) and result["test_nll"] > 0
    assert -result["test_elbo"] >= result["test_nll"] - 4 * result["test_nll_stderr"]
    return result


# ---------------------------------------------------------------------------------------------- whole runs
def test_a_hierarchy_run_trains_reloads_and_every_command_works(tmp_path, capsys):
    run = _train(tmp_path / "run", "--hierarchy", "8,4")
    _check_reload(run, HierarchicalVAE, "standard", hierarchy=(8, 4))
    result = _check_evaluate(run, capsys, {"z1": 8, "z2": 4})
    assert len(result["latent_sites"]["z2"]["kl_per_dimension"]) == 4  # Gaussian p(z_l | z_{l+1}): closed forms

    assert main(["sample", str(run), "-n", "9"]) == 0
    assert Image.open(run / "samples-9.png").size[0] > 0
    (run / "latent.png").unlink()
    assert main(["plot", str(run)]) == 0
    assert Image.open(run / "latent.png").size == (2 * 6 * 120, 5 * 120)  # one panel per layer: z1, z2

    assert main(["gaps", str(run), "--steps", "3", "--test-points", "8", "--num-samples", "10",
                 "--elbo-particles", "4", "--families", "cholesky"]) == 0
    gaps = json.loads((run / "gaps.json").read_text())  # a Gaussian over (z1, z2) of each point: 12 dimensions
    assert set(gaps["families"]) == {"cholesky"} and gaps["encoder_family"] == "HierarchicalVAE.guide"
    assert math.isfinite(gaps["log_px"]["mean"])
    capsys.readouterr()
    assert _exit_code(["evaluate", str(run), "--refine-steps", "2"]) == 2
    assert "--refine-steps" in capsys.readouterr().err


def _check_resume(half, whole, *options):
    """``--resume`` of a 1-epoch run to 2 epochs gives the weights of a 2-epoch run trained without a break."""
    assert main(["train", "--resume", str(half), "--epochs", "2", "--no-progress"]) == 0
    _train(whole, *options, "--epochs", "2")
    a, b = (load_checkpoint(r / "checkpoint.pt") for r in (whole, half))
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [m["epoch"] for m in load_run(half).metrics] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("options", [["--hierarchy", "8,4"], ["--hierarchy", "8,4", "--inference", "top-down",
                                                               "--prior", "vamp", "--prior-components", "3"]])
def test_resuming_a_hierarchy_run_matches_an_uninterrupted_run(tmp_path, options):
    _check_resume(_train(tmp_path / "half", *options), tmp_path / "whole", *options)


CASES = [(inference, prior) for inference in ("bottom-up", "top-down", None) for prior in PRIOR_CLASSES]
DEFAULT_CASES = {("top-down", "vamp"), (None, "flow")}  # and bottom-up/standard above


@pytest.mark.parametrize("inference, prior", [
    pytest.param(*case, marks=() if case in DEFAULT_CASES else pytest.mark.slow) for case in CASES])
def test_every_prior_with_every_inference_trains_reloads_and_evaluates(tmp_path, capsys, inference, prior):
    hierarchy = ["--hierarchy", "8,4", "--inference", inference] if inference else ["--z-dim", "3"]
    run = _train(tmp_path / "run", *hierarchy, *_prior_options(prior))
    if inference:
        _check_reload(run, HierarchicalVAE, prior, hierarchy=(8, 4), inference=inference)
        result = _check_evaluate(run, capsys, {"z1": 8, "z2": 4})
    else:
        _check_reload(run, VAE, prior)
        result = _check_evaluate(run, capsys, None if prior == "standard" else {"z": 3})
    if prior != "standard":  # a learned p(z) has no per-coordinate Gaussian marginals: no KL per dimension
        top = "z2" if inference else "z"
        assert result["latent_sites"][top]["kl_per_dimension"] is None
    assert main(["sample", str(run), "-n", "4"]) == 0 and (run / "samples-4.png").exists()


# ---------------------------------------------------------------------------------------------- the architecture
def _layers(net) -> list:
    """(in, out) of each Linear and the name of each activation, in order."""
    return [(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else type(m).__name__
            for m in net.modules() if not isinstance(m, torch.nn.Sequential)]


def test_hierarchy_100_50_with_tanh_is_burdas_two_layer_architecture():
    args = build_parser().parse_args(["train", "--hierarchy", "100,50", "--activation", "tanh"])
    m = build_vae(_config(_given(args)), (1, 28, 28))
    assert isinstance(m, HierarchicalVAE) and m.inference == "bottom-up"
    enc, tanh = m.encoder, "Tanh"
    # q(z_1|x): x-200-200 -> (mu, sigma) of z_1 (100); q(z_2|z_1): z_1-100-100 -> (mu, sigma) of z_2 (50)
    assert _layers(enc["trunks"][0]) == [(784, 200), tanh, (200, 200), tanh]
    assert _layers(enc["heads"][0]) == [(200, 2 * 100)]
    assert _layers(enc["trunks"][1]) == [(100, 100), tanh, (100, 100), tanh]
    assert _layers(enc["heads"][1]) == [(100, 2 * 50)]
    # the mirror: p(z_1|z_2): z_2-100-100 -> (mu, sigma) of z_1; p(x|z_1): z_1-200-200 -> 784 Bernoulli logits
    assert _layers(m.decoder[1]) == [(50, 100), tanh, (100, 100), tanh, (100, 2 * 100)]
    assert _layers(m.decoder[0]) == [(100, 200), tanh, (200, 200), tanh, (200, 784)]
    assert m.learned_prior is None and m.latent_sizes == (100, 50)
    default = HierarchicalVAE((1, 28, 28))  # the Python defaults are the same architecture
    assert _layers(default) == _layers(m) and default.inference == "bottom-up"


def test_hidden_sets_the_deterministic_layers_of_every_stochastic_layer():
    m = build_vae(RunConfig(hierarchy=(6, 3), hidden=(10, 7), inference="top-down"), (1, 8, 8))
    assert m.deterministic == ((10, 7), (10, 7))
    # top-down: trunk 2 reads trunk 1's features d_1 (7), not z_1
    assert _layers(m.encoder["trunks"][1]) == [(7, 10), "ReLU", (10, 7), "ReLU"]
    assert RunConfig(hierarchy=(6, 3)).hidden is None and RunConfig().hidden == config_module.DEFAULT_HIDDEN


def test_the_config_knows_every_prior_and_inference_and_the_help_names_the_options(capsys):
    assert config_module.PRIORS == tuple(priors.PRIORS)
    assert config_module.INFERENCE == hierarchical.INFERENCE
    assert _exit_code(["train", "--help"]) == 0
    train = capsys.readouterr().out
    for text in ("--hierarchy D1,D2,...", "--inference {bottom-up,top-down}", "--prior-components K",
                 "{standard,mog,vamp,flow,learned}", "Burda"):
        assert text in train, text


def test_a_config_written_before_hierarchies_and_learned_priors_still_loads(tmp_path):
    new = json.loads(RunConfig(z_dim=3, hidden=(16,)).to_json())
    legacy = {k: v for k, v in new.items() if k not in ("hierarchy", "inference", "prior_components")}
    (tmp_path / CONFIG).write_text(json.dumps(legacy))
    config = _read_config(tmp_path)
    assert config == RunConfig(z_dim=3, hidden=(16,)) and config.hierarchy is None
    vae = build_vae(config, (1, 8, 8))
    assert type(vae) is VAE and vae.learned_prior is None and vae.z_dim == 3


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, message", [
    (["--hierarchy", "100,x"], "argument --hierarchy: expected comma-separated latent sizes like 100,50, got '100,x'"),
    (["--hierarchy", "8,0"], "argument --hierarchy: expected positive latent sizes"),
    (["--inference", "sideways"], "argument --inference: invalid choice: 'sideways'"),
    (["--inference", "top-down"], "--inference applies to a hierarchy"),
    (["--prior", "gamma"], "argument --prior: invalid choice: 'gamma'"),
    (["--prior-components", "0"], "argument --prior-components: expected a positive integer, got '0'"),
    (["--prior", "flow", "--prior-components", "3"], "--prior-components applies to --prior mog or vamp, not flow"),
    (["--prior-components", "3"], "--prior-components applies to --prior mog or vamp, not standard"),
    (["--prior", "learned"], "--prior learned is the conditional VAE's prior network"),
    (["--conditional", "--prior", "vamp"], "--prior vamp is a prior p(z) of the unconditional VAE"),
    (["--hierarchy", "8,4", "--conditional"], "--hierarchy builds a HierarchicalVAE"),
    (["--hierarchy", "8,4", "--guide", "iaf"], "which does not take --guide iaf"),
    (["--hierarchy", "8,4", "--network", "conv"], "which does not take --network conv"),
    (["--hierarchy", "8,4", "--z-dim", "3"], "--z-dim is the single-layer VAE's latent size"),
    (["--model", "{tmp}/m.py:M", "--hierarchy", "8,4"], "--hierarchy builds the built-in VAE, not --model"),
    (["--model", "{tmp}/m.py:M", "--prior", "mog"], "--prior builds the built-in VAE, not --model"),
])
def test_bad_structure_options_exit_2_naming_the_option_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = ["train", *[a.replace("{tmp}", str(tmp_path)) for a in argv], "--out", str(out), "--epochs", "1",
            "--no-progress"]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_resume_refuses_new_structure_options(tmp_path, capsys):
    run = tmp_path / "run"
    (run).mkdir()
    assert _exit_code(["train", "--resume", str(run), "--hierarchy", "8,4", "--prior", "mog"]) == 2
    assert "--hierarchy, --prior cannot change a run being resumed" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("prior", "vampire", "--prior must be one of standard, mog, vamp, flow, learned, got 'vampire'"),
    ("hierarchy", [8, -1], "--hierarchy needs positive latent sizes"),
    ("inference", "sideways", "--inference must be one of bottom-up, top-down"),
    ("prior_components", 0, "--prior-components must be at least 1"),
])
def test_an_edited_config_with_a_bad_structure_is_refused_naming_the_field(tmp_path, field, value, message):
    d = json.loads(RunConfig(hierarchy=(8, 4), prior="mog").to_json())
    d[field] = value
    (tmp_path / CONFIG).write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _read_config(tmp_path)
