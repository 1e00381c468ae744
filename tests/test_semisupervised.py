"""The semi-supervised M2 model (Kingma et al., 2014): the enumerated bound against a hand-written sum over the
classes, the auxiliary term, learning a two-class mixture from four labels, fit's alternating batches, resume and
capture with Pyro's TraceEnum_ELBO."""
import contextlib
import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import pyro
import pyro.poutine as poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate

from pyro_vae import VAE, SemiSupervisedVAE, fit, load_dataset
from pyro_vae.distributed import World
from pyro_vae.networks import MLPEncoder
from pyro_vae.training import UNLABELLED_PER_LABELLED, Callback, TrainingData

TINY = dict(progress=False, init_output_bias="default")
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def tiny_m2(num_classes=3, guide="diagonal", aux_weight=0.0, seed=0):
    torch.manual_seed(seed)
    return SemiSupervisedVAE((1, 5), num_classes, z_dim=2, hidden=(6,), guide=guide, aux_weight=aux_weight)


def binary_points(n=4, seed=0):
    return (torch.rand(n, 1, 5, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


# ------------------------------------------------------------------------ the bound, by hand
def hand_bound(vae, x, z, y=None):
    """L(x, y) per point (y given: z of shape (N, d)), or U(x) = sum_y q(y|x) [L(x, y) - log q(y|x)] (z of shape
    (C, N, d), one draw per class), written with plain PyTorch from the networks' outputs."""
    flat = x.flatten(1)
    C = vae.num_classes

    def bound(c, z_c):  # log p(x|c,z) + log p(c) + log p(z) - log q(z|x,c), per point
        onehot = F.one_hot(c, C).float()
        logits = vae.decoder(torch.cat([z_c, onehot], -1)).reshape(flat.shape)
        log_px = (flat * logits - F.softplus(logits)).sum(-1)
        log_pz = (-0.5 * z_c ** 2 - LOG_SQRT_2PI).sum(-1)
        q = vae.posterior(vae.encoder(torch.cat([flat, onehot], -1)))  # q(z|x,c): Normal(loc, scale), d coords
        log_qz = (-0.5 * ((z_c - q.mean) / q.stddev) ** 2 - q.stddev.log() - LOG_SQRT_2PI).sum(-1)
        return log_px - math.log(C) + log_pz - log_qz

    log_qy = torch.log_softmax(vae.classifier(x), -1)  # (N, C)
    if y is not None:
        return bound(y, z) + vae.aux_weight * log_qy.gather(1, y[:, None])[:, 0]
    terms = torch.stack([bound(torch.full((x.shape[0],), c), z[c]) for c in range(C)], -1)  # (N, C)
    return (log_qy.exp() * (terms - log_qy)).sum(-1)


def enumerated_z(vae, x, y=None):
    """The z that TraceEnum_ELBO's guide draws (one per class without labels), from the same random state."""
    guide = poutine.enum(config_enumerate(vae.guide), first_available_dim=-2)
    return poutine.trace(guide).get_trace(x, y).nodes["z"]["value"]


def test_trace_enum_elbo_equals_the_hand_written_sum_over_the_classes_with_its_gradients():
    """Unlabelled: -loss = sum_n sum_y q(y|x_n) [log p(x_n|y,z) + log p(y) + log p(z) - log q(z|x_n,y)] + H(q(y|x_n)),
    one reparameterized z per (n, y), the sum over the 3 classes exact; values and every gradient match."""
    vae, x = tiny_m2(num_classes=3), binary_points()
    torch.manual_seed(5)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(vae.model, vae.guide, x)
    grads = torch.autograd.grad(loss, list(vae.parameters()), allow_unused=True)
    torch.manual_seed(5)
    z = enumerated_z(vae, x)
    assert z.shape == (3, 4, 2)
    expected = -hand_bound(vae, x, z).sum()  # (z = loc + scale * eps keeps its graph to q's parameters)
    expected_grads = torch.autograd.grad(expected, list(vae.parameters()), allow_unused=True)
    assert torch.allclose(loss, expected, rtol=1e-5)
    for g, e in zip(grads, expected_grads):
        assert (g is None and e is None) or torch.allclose(g, e, rtol=1e-4, atol=1e-6)
    assert any(g is not None and g.abs().sum() > 0 for g in grads[-2:])  # the classifier learns from U(x)


def test_labelled_loss_is_the_conditional_bound_plus_the_auxiliary_term():
    """Labelled: -loss = sum_n L(x_n, y_n) + alpha log q(y_n|x_n), the classifier reached only through alpha."""
    x, y = binary_points(), torch.tensor([0, 2, 1, 2])
    for alpha in (0.0, 2.5):
        vae = tiny_m2(num_classes=3, aux_weight=alpha)
        torch.manual_seed(7)
        loss = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False).differentiable_loss(
            vae.model, vae.guide, x, y)
        torch.manual_seed(7)
        z = enumerated_z(vae, x, y)
        assert z.shape == (4, 2)
        assert torch.allclose(loss, -hand_bound(vae, x, z, y).sum(), rtol=1e-5)
        reaches = loss.grad_fn is not None and torch.autograd.grad(
            loss, list(vae.classifier.parameters()), allow_unused=True)[0] is not None
        assert reaches == (alpha > 0)


@pytest.mark.filterwarnings("ignore:y\nIf you want to enumerate")  # (Pyro's note: Trace_ELBO samples y here)
def test_the_enumerated_bound_is_the_expectation_over_sampled_labels():
    """U(x) = E_q(y|x)[L(x, y) - log q(y|x)]: TraceEnum_ELBO (y summed out) and Trace_ELBO (y sampled from
    q(y|x)) estimate the same number; 20 means of 200 vectorized particles each, within 4 standard errors."""
    vae, x = tiny_m2(num_classes=2), binary_points(8)

    def estimates(objective):
        return torch.tensor([-objective.loss(vae.model, vae.guide, x) for _ in range(20)])

    enum = estimates(TraceEnum_ELBO(max_plate_nesting=1, num_particles=200, vectorize_particles=True))
    sampled = estimates(Trace_ELBO(max_plate_nesting=1, num_particles=200, vectorize_particles=True))
    stderr = math.sqrt(enum.var() / 20 + sampled.var() / 20)
    assert abs(enum.mean() - sampled.mean()) < 4 * stderr


def test_m2_runs_under_svi_with_config_enumerate_as_pyro_users_write_it():
    """Pyro's ss_vae_M2 style: SVI(model, config_enumerate(guide), TraceEnum_ELBO), labelled and unlabelled steps."""
    vae, x = tiny_m2(num_classes=3, aux_weight=1.0), binary_points(16)
    svi = SVI(vae.model, config_enumerate(vae.guide, "parallel"), pyro.optim.Adam({"lr": 1e-2}),
              TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False))
    first = svi.evaluate_loss(x) + svi.evaluate_loss(x[:4], torch.tensor([0, 1, 2, 0]))
    for _ in range(25):
        svi.step(x[:4], torch.tensor([0, 1, 2, 0]))
        svi.step(x)
    last = svi.evaluate_loss(x) + svi.evaluate_loss(x[:4], torch.tensor([0, 1, 2, 0]))
    assert last < first - 5, (first, last)


@pytest.mark.parametrize("guide", ["cholesky", "iaf", "lowrank"])
def test_every_posterior_family_enumerates(guide):
    """q(z|x,y) of any family broadcasts over the enumerated classes: the same hand sum (log q by the family)."""
    vae, x = tiny_m2(num_classes=2, guide=guide), binary_points()
    torch.manual_seed(3)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x)
    torch.manual_seed(3)
    z = enumerated_z(vae, x)
    log_qy = torch.log_softmax(vae.classifier(x), -1)
    total = 0.0
    for c in range(2):
        cond = F.one_hot(torch.full((4,), c), 2).float()
        q = vae.posterior(vae.encoder(torch.cat([x.flatten(1), cond], -1)))
        logits = vae.decoder(torch.cat([z[c], cond], -1)).reshape(4, 5)
        term = ((x.flatten(1) * logits - F.softplus(logits)).sum(-1) - math.log(2)
                + (-0.5 * z[c] ** 2 - LOG_SQRT_2PI).sum(-1) - q.log_prob(z[c]) - log_qy[:, c])
        total = total + (log_qy[:, c].exp() * term).sum()
    assert math.isclose(loss, -total.item(), rel_tol=1e-5)


def test_bad_arguments_are_errors_naming_them():
    with pytest.raises(ValueError, match="num_classes"):
        SemiSupervisedVAE((1, 5), 1)
    with pytest.raises(ValueError, match="aux_weight"):
        SemiSupervisedVAE((1, 5), 2, aux_weight=-1.0)
    vae = tiny_m2(num_classes=3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        vae.model(binary_points(), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="TraceEnum_ELBO"):
        fit(vae, binary_points(8), objective="analytic", epochs=1, **TINY)
    with pytest.raises(ValueError, match="unlabelled_per_labelled"):
        fit(vae, binary_points(8), objective="enum", labelled=(binary_points(2), torch.tensor([0, 1])),
            unlabelled_per_labelled=0, epochs=1, **TINY)
    assert SemiSupervisedVAE.paper_aux_weight(1000, 100) == pytest.approx(1.0)


# ------------------------------------------------------------------------ learning
def two_blobs(n, g, dim=20, separation=2.0):
    """x = +-separation e_1 + N(0, I) in ``dim`` dimensions, classes alternating; Bayes accuracy Phi(2) = 0.977."""
    y = torch.arange(n) % 2
    x = torch.randn(n, dim, generator=g)
    x[:, 0] += separation * (2 * y - 1)
    return x[:, None, :], y


def test_m2_recovers_a_two_class_mixture_from_four_labels():
    """C = 2, two labels per class among 1000 points: the classifier learns the clusters from the unlabelled
    points (accuracy > 0.9 of a Bayes 0.977) and beats the same classifier trained on the four labels alone by
    more than 0.1 (the paired standard error on 1000 test points is below 0.015)."""
    g = torch.Generator().manual_seed(0)
    x, y = two_blobs(1000, g)
    x_test, y_test = two_blobs(1000, g)
    idx = torch.cat([torch.nonzero(y == c)[:, 0][torch.randperm(500, generator=g)[:2]] for c in (0, 1)])
    unlabelled = torch.ones(len(y), dtype=torch.bool)
    unlabelled[idx] = False
    torch.manual_seed(0)
    vae = SemiSupervisedVAE((1, 20), 2, z_dim=1, hidden=(16,), likelihood="gaussian", sigma=1.0, aux_weight=1.0)
    history = fit(vae, x[unlabelled], (x_test, y_test), objective="enum", labelled=(x[idx], y[idx]), epochs=10,
                  batch_size=100, lr=1e-2, **TINY)
    m2 = (vae.classify(x_test) == y_test).float()
    torch.manual_seed(0)
    alone = MLPEncoder((1, 20), 2, (16,))
    optim = torch.optim.Adam(alone.parameters(), lr=1e-2)
    for _ in range(300):
        optim.zero_grad()
        F.cross_entropy(alone(x[idx]), y[idx]).backward()
        optim.step()
    baseline = (alone(x_test).argmax(-1) == y_test).float()
    assert m2.mean() > 0.9 and m2.mean() > baseline.mean() + 0.1, (m2.mean(), baseline.mean())
    assert (m2 - baseline).std() / math.sqrt(len(m2)) < 0.015
    assert history[-1]["val_error"] == pytest.approx(1 - float(m2.mean()))
    assert history[-1]["val_elbo"] > history[0]["val_elbo"]


# ------------------------------------------------------------------------ fit: batches, any ELBO, resume, capture
def test_an_epoch_alternates_labelled_and_unlabelled_minibatches_in_the_fixed_ratio():
    """k = 2: L U U L U U L U (8 steps for 5 unlabelled batches of 4 + 2), each unlabelled point once, the
    labelled points (3 of them, batches of 3) drawn from fresh permutations: each seen equally often."""
    x_u = torch.arange(18.0).reshape(18, 1, 1)
    x_l, y_l = 100 + torch.arange(3.0).reshape(3, 1, 1), torch.tensor([0, 1, 2])
    data = TrainingData(x=x_u, labelled=(x_l, y_l), unlabelled_per_labelled=2)
    steps = list(data.batches(torch.Generator().manual_seed(0), 4, World()))
    assert [len(b) for b in steps] == [2, 1, 1, 2, 1, 1, 2, 1]
    assert sorted(torch.cat([b[0] for b in steps if len(b) == 1]).flatten().tolist()) == list(range(18))
    labelled = [b for b in steps if len(b) == 2]
    assert all(b[0].shape[0] == 3 and torch.equal(b[1], (b[0].flatten() - 100).long()) for b in labelled)
    seen = torch.cat([b[1] for b in labelled])
    assert torch.bincount(seen, minlength=3).tolist() == [3, 3, 3]


def test_fit_trains_a_plain_vae_with_trace_enum_elbo_as_with_trace_elbo():
    """TraceEnum_ELBO on a model without discrete sites is Trace_ELBO: fit gives the same parameters (the same
    draws; float summation order aside), with max_plate_nesting guessed without moving the random stream."""
    x = load_dataset("digits").x_train[:64]
    results = []
    for objective in (Trace_ELBO(), TraceEnum_ELBO(strict_enumeration_warning=False)):
        torch.manual_seed(0)
        vae = VAE((1, 8, 8), z_dim=2, hidden=(8,))
        fit(vae, x, objective=objective, epochs=2, batch_size=32, seed=4, **TINY)
        results.append(torch.cat([p.detach().flatten() for p in vae.parameters()]))
    assert objective.max_plate_nesting == 1
    assert torch.allclose(*results, rtol=1e-4, atol=1e-5)


class _Save(Callback):
    def __init__(self, at):
        self.at, self.saved = at, None

    def on_step_end(self, state):
        if state.global_step == self.at:
            self.saved = copy.deepcopy(state.checkpoint(epoch_done=False))


@pytest.fixture(scope="module")
def digits_split():
    d = load_dataset("digits")
    return d.x_train[20:180], (d.x_train[:20], d.y_train[:20]), (d.x_val[:40], d.y_val[:40])


def test_a_resumed_semi_supervised_fit_equals_an_uninterrupted_one(digits_split):
    """Interrupted mid-epoch 2 (after a labelled step, inside the alternation), resumed: bit-identical, with a
    TraceEnum_ELBO whose plate nesting is left for fit to guess."""
    unlabelled, labelled, val = digits_split

    def run(**kwargs):
        vae = SemiSupervisedVAE((1, 8, 8), 10, z_dim=2, hidden=(8,), aux_weight=2.0)
        history = fit(vae, unlabelled, val, objective=TraceEnum_ELBO(strict_enumeration_warning=False),
                      labelled=labelled, unlabelled_per_labelled=1, epochs=3, batch_size=32, seed=2,
                      progress=False, **kwargs)
        return vae, history

    torch.manual_seed(0)
    full, history = run()
    assert [m["step"] for m in history] == [10, 20, 30]  # 5 unlabelled + 5 labelled steps per epoch
    save = _Save(at=13)
    torch.manual_seed(0)
    run(callbacks=[save])
    torch.manual_seed(1)  # another initialization: the checkpoint restores everything
    resumed, resumed_history = run(resume_state=save.saved)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert resumed_history[-1]["val_elbo"] == history[-1]["val_elbo"]


def test_capture_of_trace_enum_elbo_falls_back_to_eager_naming_pyros_host_read(digits_split, capsys):
    """Pyro's TraceEnum_ELBO reads a tensor on the host (``mask.all()`` in Dice.compute_expectation), which no
    captured graph can hold: compile falls back after one line naming the place, and trains exactly as eager."""
    unlabelled, labelled, _ = digits_split
    params = []
    for compile in (False, "graph"):
        torch.manual_seed(0)
        vae = SemiSupervisedVAE((1, 8, 8), 10, z_dim=2, hidden=(8,))
        fit(vae, unlabelled[:64], objective="enum", labelled=labelled, epochs=1, batch_size=32, compile=compile,
            progress=False)
        params.append(torch.cat([p.detach().flatten() for p in vae.parameters()]))
    err = capsys.readouterr().err
    assert err.count("could not capture the training step") == 1 and "pyro/infer/util.py" in err
    assert torch.equal(*params)


def test_m2_helpers_classify_reconstruct_and_analogies():
    vae, x = tiny_m2(num_classes=3), binary_points(4)
    probs = vae.class_probs(x)
    assert probs.shape == (4, 3) and torch.allclose(probs.sum(-1), torch.ones(4))
    assert torch.equal(vae.classify(x), probs.argmax(-1))
    grid = vae.analogies(x)
    assert grid.shape == (4, 3, 1, 5)
    for c in range(3):  # column c is the reconstruction of x with the same z, labelled c
        z = vae.posterior_mean(x, vae.classify(x))
        assert torch.allclose(grid[:, c], vae.decode(z, torch.full((4,), c)).mean)
    assert torch.allclose(vae.reconstruct(x), vae.reconstruct(x, vae.classify(x)))
    samples = vae.sample(5, label=1)
    assert samples.shape == (5, 1, 5)


# ------------------------------------------------------------------------ the command line
FAST = ["--epochs", "1", "--z-dim", "2", "--hidden", "8", "--batch-size", "128", "--no-progress", "--device", "cpu"]


def test_cli_semi_supervised_train_evaluate_sample(tmp_path, capsys):
    """train --semi-supervised --labels 20: the labels balanced per class and recorded, the analogy figure;
    evaluate reports test_error (the error of argmax q(y|x), as recomputed here) and the test ELBO with y summed
    out; sample --label 3 (and without --label, exit 2)."""
    from pyro_vae import load_run
    from pyro_vae.cli import main
    from pyro_vae.data import balanced_labels, prepare_eval_data

    run = tmp_path / "run"
    assert main(["train", "--semi-supervised", "--labels", "20", *FAST, "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    record = json.loads((run / "labels.json").read_text())
    digits = load_dataset("digits")
    assert config["objective"] == "enum" and config["aux_weight"] == SemiSupervisedVAE.DEFAULT_AUX_WEIGHT == 46
    assert config["unlabelled_per_labelled"] == 10 == UNLABELLED_PER_LABELLED  # the command line's k is fit's
    assert load_run(run).vae.aux_weight == 46
    assert record["per_class"] == [2] * 10
    assert record["indices"] == balanced_labels(digits.y_train, 20, 10, seed=0).tolist()
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= metrics["val_error"] <= 1 and metrics["val_elbo"] < 0
    assert (run / "analogies.png").stat().st_size > 0

    capsys.readouterr()
    assert main(["evaluate", str(run), "--num-samples", "20"]) == 0
    saved = json.loads((run / "eval.json").read_text())
    loaded = load_run(run)
    x_test = prepare_eval_data(loaded.vae, digits.x_test)  # (binarized once, as the classifier saw its data)
    expected = float((loaded.vae.classify(x_test) != digits.y_test).double().mean())
    assert saved["test_error"] == pytest.approx(expected) and saved["num_test"] == len(digits.y_test)
    assert saved["test_error_stderr"] == pytest.approx(math.sqrt(expected * (1 - expected) / len(digits.y_test)))
    assert saved["test_elbo"] < 0 and saved["test_nll"] > 0
    assert -saved["test_elbo"] >= saved["test_nll"] - 4 * saved["test_nll_stderr"]  # NLL <= -ELBO

    assert main(["sample", str(run), "--label", "3", "-n", "4"]) == 0
    assert (run / "samples-4-label3.png").exists()
    assert main(["sample", str(run)]) == 2
    assert "--label" in capsys.readouterr().err
    for refused in (["gaps", str(run)], ["gradient-variance", str(run)], ["evaluate", str(run), "--refine-steps", "2"]):
        assert main(refused) == 2
        assert "semi-supervised" in capsys.readouterr().err


@pytest.mark.slow  # (a few seconds: two trainings, each drawing the figures)
def test_cli_semi_supervised_resume_and_plot(tmp_path):
    """A resumed semi-supervised run continues with the same labelled points (labels.json), and plot redraws the
    analogy figure; best.pt is the epoch of lowest validation error."""
    from pyro_vae import load_run
    from pyro_vae.cli import main

    run = tmp_path / "run"
    assert main(["train", "--semi-supervised", "--labels", "20", *FAST, "--out", str(run)]) == 0
    labels = (run / "labels.json").read_text()
    (run / "analogies.png").unlink()
    assert main(["plot", str(run)]) == 0 and (run / "analogies.png").exists()
    assert main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert (run / "labels.json").read_text() == labels
    # best.pt across the resume: the first epoch of lowest validation error (the ELBO does not choose it)
    lowest = min(metrics, key=lambda m: (m["val_error"], m["epoch"]))
    assert load_run(run, best=True).epoch == lowest["epoch"]


def test_best_checkpoint_of_a_classifier_is_its_lowest_validation_error():
    """validation_score, what best.pt maximizes: minus val_error when the epoch has one (M2), else val_elbo, and
    -inf without validation."""
    from pyro_vae.runs import validation_score

    assert validation_score({"val_error": 0.25, "val_elbo": -80.0}) == -0.25
    assert validation_score({"val_error": 0.2, "val_elbo": -90.0}) > validation_score({"val_error": 0.25,
                                                                                      "val_elbo": -80.0})
    assert validation_score({"val_elbo": -80.0}) == -80.0 and validation_score({"train_loss": 1.0}) == -math.inf


@pytest.mark.parametrize("argv, message", [
    (["--labels", "20"], "apply to --semi-supervised|applies to --semi-supervised"),
    (["--semi-supervised"], "needs --labels"),
    (["--semi-supervised", "--labels", "5"], "from 10 .one per class."),
    (["--semi-supervised", "--labels", "20", "--objective", "analytic"], "--objective enum"),
    (["--semi-supervised", "--labels", "20", "--conditional"], "does not take --conditional"),
    (["--semi-supervised", "--labels", "20", "--aux-weight", "-1"], "expected a number >= 0"),
    (["--label-seed", "2"], "--label-seed applies to --semi-supervised"),
    (["--semi-supervised", "--labels", "20", "--label-seed", "-1"], "--label-seed: expected a non-negative integer"),
])
def test_cli_semi_supervised_bad_options_exit_2_naming_them(tmp_path, capsys, argv, message):
    from pyro_vae.cli import main

    with pytest.raises(SystemExit) if "-1" in argv else _no_exit() as caught:
        code = main(["train", *argv, *FAST, "--out", str(tmp_path / "run")])
    code = caught.value.code if "-1" in argv else code
    assert code == 2 and not (tmp_path / "run").exists()
    assert re.search(message, capsys.readouterr().err)


def test_cli_label_seed_draws_another_set_of_labels_and_is_fixed_on_resume(tmp_path, capsys):
    """train --label-seed 3: config.json and labels.json record seed 3 and the points balanced_labels draws with
    it (not seed 0's); a resumed run cannot change it; RunConfig refuses a negative or non-integer seed."""
    from pyro_vae import RunConfig
    from pyro_vae.cli import main
    from pyro_vae.data import balanced_labels

    run = tmp_path / "run"
    assert main(["train", "--semi-supervised", "--labels", "20", "--label-seed", "3", *FAST, "--out", str(run)]) == 0
    y = load_dataset("digits").y_train
    record = json.loads((run / "labels.json").read_text())
    assert json.loads((run / "config.json").read_text())["label_seed"] == 3 and record["label_seed"] == 3
    assert record["indices"] == balanced_labels(y, 20, 10, seed=3).tolist() != balanced_labels(y, 20, 10).tolist()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--label-seed", "4", "--no-progress"]) == 2
    assert "--label-seed cannot change a run being resumed" in capsys.readouterr().err
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="--label-seed must be an integer >= 0"):
            RunConfig(semi_supervised=True, labels=20, objective="enum", label_seed=bad).check()


@contextlib.contextmanager
def _no_exit():
    yield None


def test_balanced_labels_split_the_remainder_and_repeat_with_the_seed():
    from pyro_vae.data import DataError, balanced_labels

    y = torch.arange(60) % 3  # 20 points per class
    chosen = balanced_labels(y, 7, 3, seed=5)
    assert torch.bincount(y[chosen], minlength=3).tolist() == [3, 2, 2] and len(set(chosen.tolist())) == 7
    assert torch.equal(chosen, balanced_labels(y, 7, 3, seed=5))
    assert not torch.equal(chosen, balanced_labels(y, 7, 3, seed=6))
    unbalanced = torch.cat([y, torch.zeros(2, dtype=torch.long)])  # 22, 20, 20 points: 62 labels need 21, 21, 20
    with pytest.raises(DataError, match="needs 21 points of class 1"):
        balanced_labels(unbalanced, 62, 3)
    with pytest.raises(DataError, match="from 3 .one per class. to 60"):
        balanced_labels(y, 2, 3)


def test_a_run_written_when_the_ratio_defaulted_to_1_still_loads(tmp_path):
    """Before the default ratio became 10, every run's config.json recorded unlabelled_per_labelled = 1: a run that
    is not semi-supervised still loads (with the current default, which it does not use); a semi-supervised run
    keeps the ratio it was trained with."""
    from pyro_vae import load_run
    from pyro_vae.cli import main

    for name, options in (("plain", []), ("m2", ["--semi-supervised", "--labels", "20"])):
        run = tmp_path / name
        assert main(["train", *options, *FAST, "--out", str(run)]) == 0
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps(dict(config, unlabelled_per_labelled=1)))
        assert load_run(run).config.unlabelled_per_labelled == (1 if options else 10)
    (tmp_path / "plain" / "config.json").write_text(json.dumps(dict(config, semi_supervised=False,
                                                                    labels=None, aux_weight=None,
                                                                    unlabelled_per_labelled=3)))
    with pytest.raises(ValueError, match="--unlabelled-per-labelled applies to --semi-supervised"):
        load_run(tmp_path / "plain")  # any other ratio on a run that is not semi-supervised is still an error
