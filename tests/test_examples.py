"""Every example and benchmark runs in its quick mode, so none of them rots, and every example and docs snippet
that trains shows that it learned: the trained model beats the same model untrained on the same held-out points,
by more than 3 standard errors of the paired per-point difference."""
import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import pyro
from pyro.infer import SVI, Trace_ELBO

import pyro_vae
from pyro_vae.analysis import mean_and_stderr
from pyro_vae.conditional import ConditionalVAE
from pyro_vae.objectives import AnalyticKLELBO, FisherELBO, IWAEELBO
from scripts import assert_learned, load_script


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """Benchmarks set torch's thread count for their timings; give the rest of the test session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)




def test_vae_mnist_example_quick():
    result = load_script(ROOT / "examples" / "vae_mnist.py").main(["--quick"])
    assert result["test_elbo"] < 0
    assert_learned(result["learned"], "vae_mnist.py")


def test_iwae_example_quick():
    """Every row learns, and both IWAE rows beat the Trace_ELBO row on the same test digits (the paired per-digit
    log p(x) difference above 3 standard errors; the example's docstring has the numbers for longer runs)."""
    rows = load_script(ROOT / "examples" / "iwae_mnist.py").main(["--quick"])
    assert list(rows) == ["VAE (Trace_ELBO)", "IWAE k=5", "IWAE k=5, DReG"]
    for name, row in rows.items():
        assert math.isfinite(row["nll"]) and row["nll"] > 0
        assert_learned(row["learned"], name)
    for name in ("IWAE k=5", "IWAE k=5, DReG"):
        assert_learned(rows[name]["vs_elbo"], f"{name} over the Trace_ELBO row")


def test_full_covariance_example_quick(tmp_path):
    rows = load_script(ROOT / "examples" / "full_covariance.py").main(["--quick", "--out", str(tmp_path)])
    assert [r["guide"] for r in rows] == ["diagonal", "cholesky", "lowrank", "iaf"]
    assert all(r["test_nll"] > 0 and r["test_elbo"] < 0 for r in rows)
    for r in rows:
        assert_learned(r["learned"], r["guide"])


def test_cvae_example_quick(tmp_path):
    result = load_script(ROOT / "examples" / "cvae_mnist.py").main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "label-2.png").exists()
    assert set(result["quadrants"]) == {1, 2, 3}
    assert all(r["nll"] > 0 for r in result["quadrants"].values())
    assert_learned(result["labels"]["learned"], "labels")
    for given, r in result["quadrants"].items():
        assert_learned(r["learned"], f"{given} quadrants given")


def test_inference_gaps_example_quick(tmp_path):
    report = load_script(ROOT / "examples" / "inference_gaps.py").main(["--quick", "--out", str(tmp_path)])
    assert set(report["families"]) == {"diagonal", "cholesky", "flow"}
    assert (tmp_path / "diagonal" / "gaps.json").exists() and (tmp_path / "diagonal" / "gaps-convergence.png").exists()
    assert_learned(report["learned"], "inference_gaps.py")


def test_gaps_mnist_benchmark_quick(tmp_path):
    rows = load_script(ROOT / "benchmarks" / "gaps_mnist.py").main(["--quick", "--quiet", "--out", str(tmp_path)])
    assert [r["model"] for r in rows] == ["diagonal", "cholesky", "iaf"]
    assert all(math.isfinite(r["families"]["cholesky"]["approximation_gap"]["mean"]) for r in rows)
    assert (tmp_path / "gaps_mnist.md").exists() and (tmp_path / "gaps-summary.png").exists()


def test_custom_objective_example_quick(tmp_path):
    """A new objective is one formula and a small class: it trains in fit and from the command line."""
    from pyro_vae.cli import main

    results = load_script(ROOT / "examples" / "custom_objective.py").main(["--quick"])
    assert set(results) == {"elbo", "iwae", "ciwae"} and all(r["nll"] > 0 for r in results.values())
    for name, r in results.items():
        assert_learned(r["learned"], name)
    run = tmp_path / "run"
    assert main(["train", "--objective", "ciwae", "--num-particles", "3", "--beta", "0.3", "--epochs", "1",
                 "--z-dim", "2", "--hidden", "8", "--no-progress", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["objective"] == "ciwae"


def _snippet_vae():
    """The docs' ``VAE(input_shape=(1, 28, 28), z_dim=20, likelihood="bernoulli")``, on the 8x8 digits."""
    return pyro_vae.VAE(input_shape=(1, 8, 8), z_dim=20, likelihood="bernoulli")


# The SVI snippets of README.md ("From Python"; docs/index.md repeats the first) and docs/*.md: the VAE each
# builds, its objective, and whether svi.step takes labels too (docs/conditional.md's ConditionalVAE).
DOC_SNIPPETS = {
    "README-trace-elbo": (_snippet_vae, Trace_ELBO, False),
    "README-iwae-dreg": (_snippet_vae, lambda: IWAEELBO(num_particles=5, estimator="dreg"), False),
    "objectives.md-analytic": (_snippet_vae, AnalyticKLELBO, False),
    "objectives.md-iwae50-dreg": (_snippet_vae, lambda: IWAEELBO(num_particles=50, estimator="dreg"), False),
    "fisher.md": (_snippet_vae, lambda: FisherELBO(fisher_weight=1.0, decoder_score_weight=0.0), False),
    "conditional.md": (lambda: ConditionalVAE((1, 8, 8), num_classes=10, z_dim=4, hidden=(256,)), Trace_ELBO, True),
    "declaring-a-vae.md": (lambda: pyro_vae.VAE(input_shape=(1, 8, 8), z_dim=8, hidden=(128,)), Trace_ELBO, False),
}
SNIPPET_STEPS = 4  # batches of 128 binarized digits


@pytest.mark.parametrize("snippet", list(DOC_SNIPPETS))
def test_docs_svi_snippet_learns_on_digits(snippet):
    """The snippet's loop, ``SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), objective)`` and ``svi.step`` on
    batches of 128 digits: Pyro's param store then holds every parameter of the VAE (what SVI updates), and the
    held-out ELBO (10 particles per test digit, the same random stream for every model) beats the untrained
    copy's, and the copy taken halfway (training kept going after its first steps), each by more than 3 standard
    errors of the paired per-digit difference."""
    make_vae, make_objective, labelled = DOC_SNIPPETS[snippet]
    data = pyro_vae.load_dataset("digits")
    binarize = torch.Generator().manual_seed(0)
    x_train, x_test = (torch.bernoulli(x, generator=binarize) for x in (data.x_train, data.x_test))
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = make_vae()
    copies = {"untrained": copy.deepcopy(vae)}
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), make_objective())
    for step, batch in enumerate(torch.arange(SNIPPET_STEPS * 128).split(128)):
        if step == SNIPPET_STEPS // 2:
            copies["halfway"] = copy.deepcopy(vae)
        svi.step(x_train[batch], *((data.y_train[batch],) if labelled else ()))

    stored = {id(p) for _, p in pyro.get_param_store().named_parameters()}
    assert stored and all(id(p) in stored for p in vae.parameters()), "SVI's param store lacks the VAE's parameters"
    held_out = (x_test, data.y_test) if labelled else (x_test,)
    elbo = {}
    for name, model in {"trained": vae, **copies}.items():
        torch.manual_seed(1)
        elbo[name] = pyro_vae.evaluation.elbo(model.model, model.guide, held_out, num_particles=10)
    for baseline in copies:
        assert_learned(mean_and_stderr(elbo["trained"] - elbo[baseline]), f"{snippet}, from {baseline}")


def test_renyi_from_the_command_line(tmp_path):
    from pyro_vae.cli import main

    run = tmp_path / "run"
    assert main(["train", "--objective", "renyi", "--alpha", "0.5", "--num-particles", "3", "--estimator", "dreg",
                 "--epochs", "2", "--z-dim", "2", "--hidden", "8", "--no-progress", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["objective"], config["alpha"], config["estimator"]) == ("renyi", 0.5, "dreg")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    assert main(["train", "--objective", "elbo", "--alpha", "0.5", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_against_revision_benchmark_quick(tmp_path):
    rows = load_script(ROOT / "benchmarks" / "against_revision.py").main(
        ["--quick", "--base", "HEAD", "--out", str(tmp_path / "a.json")])
    assert len(rows) == 5 and all(r["base_ms"] > 0 and r["new_ms"] > 0 for r in rows)


def test_speed_benchmark_quick(tmp_path):
    rows, evals = load_script(ROOT / "benchmarks" / "speed.py").main(["--quick", "--out", str(tmp_path / "s.json")])
    assert len(rows) == 1 and rows[0]["fit_s"] > 0 and rows[0]["hand_s"] > 0 and rows[0]["hand_foreach_s"] > 0
    assert evals[0]["ours_points_per_s"] > 0 and evals[0]["hand_points_per_s"] > 0
    assert json.loads((tmp_path / "s.json").read_text())["rows"]


def test_iwae_table_benchmark_quick(tmp_path):
    out = tmp_path / "table"
    rows = load_script(ROOT / "benchmarks" / "iwae_table.py").main(
        ["--quick", "--quiet", "--out", str(out), "--models", "vae,iwae5"])
    assert [r["model"] for r in rows] == ["VAE", "IWAE k=5"]
    assert all(r["test_nll"] > 0 and r["epochs"] == 1 for r in rows)
    # running it again resumes (nothing left to train) and gives the same table
    again = load_script(ROOT / "benchmarks" / "iwae_table.py").main(
        ["--quick", "--quiet", "--out", str(out), "--models", "vae"])
    assert again[0]["epochs"] == 1


def test_fisher_vs_vae_benchmark_quick(tmp_path):
    rows = load_script(ROOT / "benchmarks" / "fisher_vs_vae.py").main(["--quick", "--out", str(tmp_path)])
    assert [r["objective"] for r in rows] == ["elbo", "fisher"]
    assert all(r["test_nll"] > 0 for r in rows)
    assert (tmp_path / "fisher" / "samples.png").exists()


def test_gradient_variance_cli_toy(tmp_path, capsys):
    from pyro_vae.cli import main

    assert main(["gradient-variance", "--toy", "--repetitions", "200", "--out", str(tmp_path)]) == 0
    for ext in ("md", "json", "png"):
        assert (tmp_path / f"gradient_variance_toy.{ext}").stat().st_size > 0
    rows = json.loads((tmp_path / "gradient_variance_toy.json").read_text())
    assert {r["estimator"] for r in rows} == {"score_function", "reparameterization"}


def test_gradient_variance_cli_on_a_run(tmp_path):
    from pyro_vae.cli import main

    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--z-dim", "2", "--hidden", "16", "--no-progress", "--out", str(run)]) == 0
    assert main(["gradient-variance", str(run), "--repetitions", "20", "--batch-size", "16",
                 "--estimators", "reparam,score,analytic,iwae-5,dreg-5"]) == 0
    rows = {r["estimator"]: r for r in json.loads((run / "gradient_variance_vae.json").read_text())}
    assert rows["reparam"]["total_variance"] < rows["score"]["total_variance"]
    assert (run / "gradient_variance_vae.png").exists()


def test_reference_burda_quick(tmp_path):
    """The plain-PyTorch reference trains and reports an NLL no better than its own ELBO allows (NLL <= -ELBO)."""
    result = load_script(ROOT / "benchmarks" / "reference_burda.py").main(["--quick", "--out", str(tmp_path / "r.json")])
    assert result["num_test"] == 50 and len(result["per_point_nll"]) == 50
    # the importance-sampled log p(x) is a tighter bound than the ELBO on average: NLL <= -ELBO up to noise
    assert result["test_nll"] <= -result["test_elbo"] + 3 * result["test_elbo_stderr"]
    assert json.loads((tmp_path / "r.json").read_text())["test_nll"] == result["test_nll"]


def test_burda_pyro_vae_quick_agrees_with_the_reference_estimator(tmp_path):
    """pyro-vae's log_likelihood and the hand-written estimator agree on the same weights, within their noise."""
    r = load_script(ROOT / "benchmarks" / "burda_pyro_vae.py").main(["--quick", "--out", str(tmp_path / "p.json")])
    diff = [a - b for a, b in zip(r["per_point_nll"], r["per_point_nll_pyro_vae"])]
    n = len(diff)
    mean = sum(diff) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1) / n)
    assert abs(mean) <= 4 * se + 1e-3  # two independent K=20 estimates of the same log p(x): paired difference ~ 0


def test_burda_ablation_plans_commands_both_scripts_accept():
    """Every planned run is a command line the reference or pyro-vae script parses (the plan cannot rot)."""
    ablation = load_script(ROOT / "benchmarks" / "burda_ablation.py")
    parsers = {"reference": load_script(ROOT / "benchmarks" / "reference_burda.py").parse_args,
               "pyro-vae": load_script(ROOT / "benchmarks" / "burda_pyro_vae.py").parse_args}
    stages = ["screen", "confirm", "iwae", "seed", "iwae-confirm", "confirm-ref", "iwae-confirm-ref"]
    for stage in stages:
        for name, kind, opts in ablation.plan(stage):
            argv = ablation.command(name, kind, opts, "/data")[2:]
            args = parsers[kind](argv)
            assert args.name == name and args.data_dir == "/data"
    assert ablation.paired([1.0, 2.0, 4.0], [0.0, 1.0, 2.0]) == (4 / 3, math.sqrt(1 / 3) / math.sqrt(3))


def test_loss_overhead_benchmark_quick():
    speed = load_script(ROOT / "benchmarks" / "speed.py")
    cost, trainer = load_script(ROOT / "benchmarks" / "loss_overhead.py").main(["--rounds", "20"])
    assert set(cost) == {"hand-written", "fit's loss"} and all(f > 0 and b > 0 for f, b in cost.values())
    assert len(trainer) == 2 and all(ms > 0 for ms in trainer.values())
    assert sys.modules["speed"].Z == speed.Z == 20  # the tiny VAE's z_dim was put back


@pytest.mark.slow
def test_compile_variants_benchmark_quick():
    times = load_script(ROOT / "benchmarks" / "compile_variants.py").main(["--rounds", "1", "--steps", "1"])
    assert {"hand", "fit", "fit --compile", "floor"} <= set(times) and all(t > 0 for t in times.values())
    assert torch._dynamo.config.compiled_autograd is False  # the whole-step variant left the global config alone


def test_own_model_example_quick():
    """A tutorial-style VAE of the user's own (examples/own_model.py): trained, evaluated, decomposed; it learned."""
    result = load_script(ROOT / "examples" / "own_model.py").main(["--quick"])
    assert result["captured"]  # its training step ran on a captured graph
    assert result["test_nll"] < -result["test_elbo"] and result["latent_sites"]["z"]["dims"] == 4
    assert set(result["gaps"]["families"]) == {"diagonal", "cholesky"}
    assert_learned(result["learned"], "own_model.py")


@pytest.mark.slow  # (about 3 s: 20 epochs of M2 on the digits)
def test_semi_supervised_example_quick_beats_the_classifier_on_the_labels_alone(tmp_path):
    """M2 with 30 labels beats q(y|x)'s architecture trained on the same 30 labels alone (the paired per-test-digit
    accuracy gain above 3 standard errors), and its ELBO beats its untrained copy's; the figures are written."""
    result = load_script(ROOT / "examples" / "semi_supervised.py").main(["--quick", "--out", str(tmp_path)])
    assert result["test_error"] < result["supervised_test_error"]
    assert_learned(result["vs_supervised"], "M2 over the supervised-only classifier (accuracy)")
    assert_learned(result["learned"], "M2's ELBO")
    assert (tmp_path / "analogies.png").exists() and (tmp_path / "samples-label3.png").exists()


@pytest.mark.slow  # (about 5 s: three trainings through the command line, each drawing its figures)
def test_semi_supervised_mnist_benchmark_quick_trains_evaluates_resumes_and_reports(tmp_path):
    """benchmarks/semi_supervised_mnist.py --quick: runs m2-l30-s0 and m2-l30-s1 trained through the command line
    with their own label draws (labels.json = balanced_labels with that seed), both classifiers better than
    guessing (10 classes: error 0.9) by 3 standard errors, the paired difference equal to the difference of the
    errors; run again with a larger --epochs it continues the same runs, and --report prints their table."""
    from pyro_vae.data import balanced_labels

    out = tmp_path / "m2"
    bench = load_script(ROOT / "benchmarks" / "semi_supervised_mnist.py")
    rows = bench.main(["--quick", "--quiet", "--out", str(out)])["rows"]
    assert [(r["run"], r["labels"], r["label_seed"], r["epochs"]) for r in rows] == \
        [("m2-l30-s0", 30, 0, 2), ("m2-l30-s1", 30, 1, 2)]
    digits = pyro_vae.load_dataset("digits")
    draws = [json.loads((out / r["run"] / "labels.json").read_text())["indices"] for r in rows]
    assert draws == [balanced_labels(digits.y_train, 30, 10, seed=s).tolist() for s in (0, 1)] and draws[0] != draws[1]
    for r in rows:
        for key in ("test_error", "test_error_stderr", "baseline_test_error", "baseline_test_error_stderr"):
            assert 0 <= r[key] <= 1, (key, r[key])
        assert r["test_error"] < 0.9 - 3 * r["test_error_stderr"]  # M2 learned to classify
        assert r["baseline_test_error"] < 0.9 - 3 * r["baseline_test_error_stderr"]
        assert r["m2_minus_baseline"]["mean"] == pytest.approx(r["test_error"] - r["baseline_test_error"])
        assert r["num_test"] == len(digits.y_test) and r["train_seconds"] > 0
        val = {m["epoch"]: m["val_error"] for m in map(json.loads, (out / r["run"] / "metrics.jsonl").read_text()
                                                         .splitlines())}
        best = r["best"]  # best.pt: the first epoch of lowest validation error, scored on the test digits
        assert best["epoch"] == min(val, key=lambda e: (val[e], e)) and best["val_error"] == min(val.values())
        assert best["m2_minus_baseline"]["mean"] == pytest.approx(best["test_error"] - r["baseline_test_error"])

    again = bench.main(["--quick", "--quiet", "--out", str(out), "--seeds", "0", "--epochs", "3"])["rows"]
    assert [(r["run"], r["epochs"]) for r in again] == [("m2-l30-s0", 3)]
    assert [json.loads(line)["epoch"] for line in (out / "m2-l30-s0" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3]
    with pytest.raises(SystemExit, match="lr: 0.01 there, 0.5 asked"):  # not resumed with other settings
        bench.main(["--quick", "--quiet", "--out", str(out), "--seeds", "0", "--lr", "0.5"])
    table = bench.main(["--report", "--out", str(out)])["report"]
    assert "| 30 | 2 |" in table and "m2-l30-s0 | 3 |" in table and "m2-l30-s1 | 2 |" in table
    assert "--label-seed 0" in table  # the command beside the table


def test_semi_supervised_mnist_report_averages_over_label_draws(tmp_path):
    """--report: per label count the mean ± sample standard deviation over the label draws (in percent), one draw
    with its own standard error, of M2 at its lowest-validation-error epoch (``best``; the last epoch for a
    record without one) and at its last epoch, Kingma et al.'s M2 column beside it, the range of epochs; one row
    per run."""
    import statistics

    bench = load_script(ROOT / "benchmarks" / "semi_supervised_mnist.py")
    errors = {(100, 0): (0.10, 0.30), (100, 1): (0.12, 0.25), (100, 2): (0.17, 0.32), (600, 0): (0.05, 0.12)}
    for (n, s), (m2, alone) in errors.items():
        record = {"run": bench.run_name(n, s), "labels": n, "label_seed": s, "epochs": 5 + s, "train_seconds": 90.0,
                  "median_epoch_seconds": 18.0, "val_error": 0.2, "test_error": m2, "test_error_stderr": 0.003,
                  "baseline_test_error": alone, "baseline_test_error_stderr": 0.004,
                  "m2_minus_baseline": {"mean": m2 - alone, "stderr": 0.005},
                  "driver_command": "python benchmarks/semi_supervised_mnist.py --epochs 5",
                  "train_command": f"pyro-vae train --semi-supervised --labels {n} --label-seed {s}"}
        if n == 100:  # selected by the validation error: 0.01 better than the last epoch
            record["best"] = {"epoch": 3, "val_error": 0.15, "test_error": m2 - 0.01, "test_error_stderr": 0.002,
                              "m2_minus_baseline": {"mean": m2 - 0.01 - alone, "stderr": 0.006}}
        (tmp_path / f"{record['run']}.json").write_text(json.dumps(record))
    table = bench.main(["--report", "--out", str(tmp_path)])["report"]

    def cell(values):
        return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"

    m2 = [errors[100, s][0] for s in range(3)]
    selected = [e - 0.01 for e in m2]
    alone = [errors[100, s][1] for s in range(3)]
    assert (f"| 100 | 3 | {cell(selected)} | {cell(m2)} | {cell(alone)} | "
            f"{cell([a - b for a, b in zip(selected, alone)])} | 11.97 ± 1.71 | 5–7 | 1.5 min |") in table
    assert ("| 600 | 1 | 5.00 (± 0.30 s.e.) | 5.00 (± 0.30 s.e.) | 12.00 (± 0.40 s.e.) | -7.00 (± 0.50 s.e.) | "
            "4.94 ± 0.13 | 5 |") in table
    assert ("| m2-l100-s2 | 7 | 1.5 min | 18.0 | 3 (0.1500) | 0.1600 ± 0.0020 | 0.1700 ± 0.0030 | 0.3200 ± 0.0040 | "
            "-0.1600 ± 0.0060 |") in table
    assert "| m2-l600-s0 | 5 | 1.5 min | 18.0 | 5 (0.2000) | 0.0500 ± 0.0030 | 0.0500 ± 0.0030 |" in table
    assert "python benchmarks/semi_supervised_mnist.py --epochs 5" in table
