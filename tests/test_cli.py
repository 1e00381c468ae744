import json
import math
import subprocess
import sys

import pytest

from pyro_vae import load_run
from pyro_vae.cli import main

FAST = ["--epochs", "2", "--z-dim", "2", "--hidden", "32", "--no-progress"]
FIGURES = ["samples.png", "reconstructions.png", "latent.png", "curves.png"]


def test_train_evaluate_sample_plot_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(run)]) == 0
    for f in ["config.json", "metrics.jsonl", "checkpoint.pt", *FIGURES]:
        assert (run / f).stat().st_size > 0, f
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["val_elbo"]) for m in metrics)
    config = json.loads((run / "config.json").read_text())
    assert config["z_dim"] == 2 and config["hidden"] == [32] and config["epochs"] == 2

    capsys.readouterr()
    assert main(["evaluate", str(run), "--num-samples", "50"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "eval.json").read_text())
    assert printed == saved
    assert saved["test_elbo"] < 0 and saved["test_nll"] > 0
    assert -saved["test_elbo"] >= saved["test_nll"] - 4 * saved["test_nll_stderr"]  # NLL <= -ELBO
    assert saved["num_samples"] == 50 and 0 <= saved["active_units"] <= 2

    assert main(["sample", str(run), "-n", "16"]) == 0
    assert (run / "samples-16.png").exists()
    for f in FIGURES:
        (run / f).unlink()
    assert main(["plot", str(run)]) == 0
    assert all((run / f).exists() for f in FIGURES)

    loaded = load_run(run)
    assert loaded.epoch == 2 and loaded.vae.z_dim == 2 and len(loaded.metrics) == 2
    assert loaded.vae.sample(3).shape == (3, 1, 8, 8)


def test_console_script_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pyro_vae.cli", "train", "--epochs", "1", "--hidden", "16",
                          "--out", str(tmp_path / "r"), "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "run written to" in out.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--likelihood", "poisson"], "invalid choice: 'poisson'"),
        (["train", "--z-dim", "0"], "expected a positive integer"),
        (["train", "--hidden", "a,b"], "layer sizes"),
        (["train", "--lr", "-1"], "expected a positive number"),
        (["train", "--objective", "nope"], "argument --objective: invalid choice: 'nope'"),
        (["train", "--guide", "nope"], "argument --guide: invalid choice: 'nope'"),
        (["train", "--dataset", "mnist", "--data-dir", "{tmp}/empty"], "MNIST files not found"),
        (["train", "--binarize", "none", "--likelihood", "bernoulli"], "needs binary data"),
        (["train", "--likelihood", "gaussian", "--sigma", "zero"], "sigma must be"),
        (["train", "--activation", "swish"], "argument --activation: invalid choice: 'swish'"),
        (["train", "--network", "conv", "--dataset", "digits", "--hidden", "0"], "positive layer sizes"),
        (["evaluate", "{tmp}/missing"], "not a pyro-vae run directory"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(out), "--epochs", "1", "--no-progress"]
    code = _exit_code(argv)
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1  # one line naming the problem, no usage dump, no traceback
    assert not out.exists()


def test_occupied_output_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["train", *FAST, "--out", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def _exit_code(argv):
    """main()'s return code, or argparse's SystemExit code for a usage error."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_conditional_run_samples_only_the_requested_label(tmp_path, capsys):
    run = tmp_path / "cvae"
    assert main(["train", *FAST, "--conditional", "--prior", "learned", "--out", str(run)]) == 0
    assert main(["sample", str(run), "--label", "2", "-n", "9"]) == 0
    assert (run / "samples-9-label2.png").exists()
    capsys.readouterr()
    assert _exit_code(["sample", str(run), "-n", "4"]) == 2
    assert "give --label K" in capsys.readouterr().err
    assert _exit_code(["sample", str(run), "--label", "10"]) == 2
    assert main(["evaluate", str(run), "--num-samples", "20"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["test_nll"] > 0 and result["test_elbo"] < 0
    assert main(["plot", str(run), "--latent", "tsne"]) == 0


def test_kl_warmup_anneals_beta_and_best_checkpoint_is_the_best_epoch(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "4", "--z-dim", "2", "--hidden", "32", "--no-progress", "--objective",
                 "analytic", "--kl-warmup", "4", "--out", str(run)]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["beta"] for m in metrics] == [0.25, 0.5, 0.75, 1.0]
    best_epoch = max(metrics, key=lambda m: m["val_elbo"])["epoch"]
    assert load_run(run, best=True).epoch == best_epoch
    assert load_run(run).epoch == 4


def test_kl_warmup_needs_an_objective_with_a_kl_weight(tmp_path, capsys):
    assert main(["train", *FAST, "--objective", "elbo", "--kl-warmup", "3", "--out", str(tmp_path / "r")]) == 2
    assert "--kl-warmup needs" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
