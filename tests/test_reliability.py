"""Resume after SIGKILL, atomic checkpoints, the divergence guard, safe loading, fuzzed input."""
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyro

import pyro_vae.training as training
from pyro_vae import RunConfig, VAE, fit, load_dataset, load_run, train_run
from pyro_vae.cli import main
from pyro_vae.data import DataError, check_data, check_labels
from pyro_vae.runs import load_checkpoint
from pyro_vae.training import DivergenceError

from idx import write_mnist

TRAIN = ["train", "--epochs", "6", "--batch-size", "16", "--z-dim", "2", "--hidden", "24", "--no-progress",
         "--checkpoint-every", "7steps"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "pyro_vae.cli", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _final_params(run_dir):
    return load_checkpoint(Path(run_dir) / "checkpoint.pt")["model"]


def _assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    p = _cli(*TRAIN, "--out", str(out))
    assert p.wait(timeout=240) == 0, p.stderr.read()
    return out


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    out = tmp_path / "run"
    p = _cli(*TRAIN, "--out", str(out))
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # epoch 1 is done: kill in the middle of epoch 2 (of 6)
    assert p.poll() is None, "training finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    epochs_done = len((out / "metrics.jsonl").read_text().splitlines())
    assert epochs_done < 6
    r = _cli("train", "--resume", str(out), "--no-progress")
    assert r.wait(timeout=240) == 0, r.stderr.read()
    _assert_same_params(_final_params(out), _final_params(uninterrupted))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, 7))
    assert [m["train_loss"] for m in metrics] == pytest.approx([m["train_loss"] for m in ref], rel=1e-6)


KILL_IN_WRITE = textwrap.dedent("""
    import os, signal, sys
    import pyro_vae.data as data
    import pyro_vae.runs as runs
    calls = [0]
    original = data.atomic_write
    def dying_write(path, write):
        calls[0] += 1
        if calls[0] == int(sys.argv[1]):          # die half-way through this write
            tmp = path.parent / ("." + path.name + ".dying.tmp")
            with open(tmp, "wb") as f:
                f.write(b"partial checkpoint bytes")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        return original(path, write)
    data.atomic_write = runs.atomic_write = dying_write  # every atomic write of a run goes through it
    from pyro_vae.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
    out = tmp_path / "run"
    script = tmp_path / "kill_in_write.py"
    script.write_text(KILL_IN_WRITE)
    # write 1 is config.json; writes 2.. are checkpoints: die during the 5th write
    p = subprocess.run([sys.executable, str(script), "5", *TRAIN, "--out", str(out)], env=ENV,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == -signal.SIGKILL
    state = load_checkpoint(out / "checkpoint.pt")  # the previous checkpoint is intact and loads
    assert state["global_step"] > 0
    r = _cli("train", "--resume", str(out), "--no-progress")
    assert r.wait(timeout=240) == 0, r.stderr.read()
    _assert_same_params(_final_params(out), _final_params(uninterrupted))


class _NaNAt(pyro.infer.Trace_ELBO):
    """Trace_ELBO whose loss becomes NaN from optimizer call number ``at`` on (for ``count`` calls)."""

    def __init__(self, at, count=10**9):
        super().__init__()
        self.calls, self.at, self.count = 0, at, count

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = super().differentiable_loss(model, guide, *args, **kwargs)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.at <= self.calls < self.at + self.count:
                return loss * float("nan")
        return loss


def test_nan_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    steps_per_epoch = -(-load_dataset().x_train.shape[0] // 64)
    monkeypatch.setattr(training, "resolve_objective", lambda *a, **k: _NaNAt(steps_per_epoch + 5))
    out = tmp_path / "run"
    config = RunConfig(epochs=3, z_dim=2, hidden=(16,))
    with pytest.raises(DivergenceError, match=rf"step {steps_per_epoch + 5} .*last good checkpoint: .*checkpoint.pt"):
        train_run(config, out, progress=False)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 1  # the state after epoch 1, not overwritten by a bad state
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_on_nan_skip_drops_the_bad_steps_and_keeps_training():
    d = load_dataset()
    vae = VAE(input_shape=d.input_shape, z_dim=2, hidden=(16,))
    hist = fit(vae, d.x_train, objective=_NaNAt(3, count=4), epochs=2, batch_size=64, progress=False,
               on_nan="skip")
    assert hist[0]["skipped_steps"] == 4 and "skipped_steps" not in hist[1]
    assert all(torch.isfinite(p).all() for p in vae.parameters())


def test_a_malicious_checkpoint_is_refused_without_running_its_payload(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--hidden", "8", "--z-dim", "2", "--no-progress",
                 "--out", str(run)]) == 0
    with open(run / "checkpoint.pt", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        load_run(run)
    assert main(["evaluate", str(run)]) == 2
    assert "refusing to load" in capsys.readouterr().err
    torch.save({"model": Payload()}, run / "checkpoint.pt")  # the torch zip format, same payload
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(run / "checkpoint.pt")
    assert not marker.exists()


def test_unwritable_output_directory_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", "--epochs", "1", "--no-progress", "--out", str(blocker / "run")]) == 2
    assert "cannot write to output directory" in capsys.readouterr().err


# ------------------------------------------------------------------ property-based tests of the input paths
arrays = st.builds(
    lambda shape, dtype, poison, seed: _array(shape, dtype, poison, seed),
    st.lists(st.integers(0, 5), min_size=0, max_size=4),
    st.sampled_from(["float32", "float64", "int64", "uint8", "bool"]),
    st.sampled_from([None, "nan", "inf", "-inf"]),
    st.integers(0, 2**16),
)


def _array(shape, dtype, poison, seed):
    a = np.random.default_rng(seed).random(shape).astype(dtype)
    if poison and a.size and np.issubdtype(a.dtype, np.floating):
        a.flat[seed % a.size] = float(poison)
    return a


@settings(max_examples=150, deadline=None)
@given(arrays, st.sampled_from([None, (1, 2, 2), (4,), (2, 3)]))
def test_check_data_accepts_valid_data_and_names_the_problem_otherwise(a, input_shape):
    try:
        x = check_data(a, input_shape)
    except DataError as e:
        assert str(e)
        return
    assert torch.isfinite(x).all() and x.shape[0] > 0 and x.is_floating_point()
    if input_shape is not None:
        assert tuple(x.shape[1:]) == input_shape


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-3, 12), min_size=0, max_size=8), st.integers(0, 9), st.integers(1, 10))
def test_labels_in_range_or_a_clear_error(labels, n_extra, num_classes):
    n = len(labels) if n_extra % 3 else len(labels) + 1
    try:
        y = check_labels(labels, n, num_classes)
    except DataError as e:
        assert any(w in str(e) for w in ("out of range", "non-negative", "vector of", "integers"))
        return
    assert y.shape == (n,) and (n == 0 or (y.min() >= 0 and y.max() < num_classes))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"]),
       st.integers(0, 3000), st.sampled_from(["truncate", "flip"]))
def test_corrupt_idx_files_give_a_data_error(tmp_path_factory, name, cut, how):
    root = tmp_path_factory.mktemp("idx")
    raw = write_mnist(root, n_train=12, n_test=4)
    data = bytearray((raw / name).read_bytes())
    if how == "truncate":
        data = data[: cut % len(data)]
    else:
        data[cut % 16] ^= 0xFF  # corrupt the header
    (raw / name).write_bytes(bytes(data))
    try:
        d = load_dataset("mnist", root)
    except DataError as e:
        assert "MNIST" in str(e)
        return
    assert d.x_train.shape[1:] == (1, 28, 28)  # a harmless flip (e.g. of padding) may still read


cli_options = st.fixed_dictionaries({}, optional={
    "--z-dim": st.sampled_from(["0", "-1", "2", "x", "1e3"]),
    "--epochs": st.sampled_from(["0", "1", "-5", "one"]),
    "--batch-size": st.sampled_from(["0", "1", "5000", "1.5"]),
    "--lr": st.sampled_from(["0", "-0.1", "nan", "inf", "1e-3", "abc"]),
    "--likelihood": st.sampled_from(["bernoulli", "gaussian", "laplace", "continuous-bernoulli", "poisson", ""]),
    "--objective": st.sampled_from(["elbo", "analytic", "iwae", "bogus"]),
    "--val-fraction": st.sampled_from(["0.1", "0", "1", "-0.2", "0.99"]),
    "--hidden": st.sampled_from(["16", "8,8", "", "0", "a"]),
    "--dataset": st.sampled_from(["digits", "mnist", "nope"]),
    "--checkpoint-every": st.sampled_from(["1", "3steps", "0", "steps", "-2"]),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cli_options)
def test_fuzzed_cli_options_train_or_fail_cleanly(tmp_path_factory, options):
    out = tmp_path_factory.mktemp("cli") / "run"
    argv = ["train", "--no-progress", "--out", str(out), "--data-dir", str(out.parent / "no-data")]
    for k, v in options.items():
        argv += [k, v]
    if "--epochs" not in options:
        argv += ["--epochs", "1"]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    assert code in (0, 2)
    if code == 0:
        assert (out / "checkpoint.pt").exists() and (out / "samples.png").exists()
    else:
        assert not out.exists()
