"""Data-parallel training under torchrun (Gloo, 2 CPU processes)."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_vae import evaluate_run, load_run
from pyro_vae.cli import main

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(var, None)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "graph"], ids=["eager", "captured"])
def test_two_processes_equal_one_process_with_the_doubled_batch(tmp_path, mode):
    """DDP's averaged gradients (eager), or the captured step's own all-reduce (``compile="graph"``): 2 gloo
    processes with batch B end where 1 process with batch 2B ends."""
    single, double = tmp_path / "single.pt", tmp_path / "ddp.pt"
    p = subprocess.run([sys.executable, str(HERE / "ddp_script.py"), str(single), "16", mode], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    p = _torchrun(str(HERE / "ddp_script.py"), str(double), "8", mode)
    assert p.returncode == 0, p.stderr
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-5, msg=k)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    # and the parameters did move: the comparison is not between two initializations
    init = torch.load(single, weights_only=True)
    assert init["train_loss"] > 0


@pytest.mark.slow
def test_cli_under_torchrun_writes_once_and_reloads(tmp_path):
    out = tmp_path / "run"
    p = _torchrun("-m", "pyro_vae.cli", "train", "--epochs", "2", "--z-dim", "2", "--hidden", "16",
                  "--no-progress", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in out.iterdir()) == sorted(
        ["config.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "samples.png", "reconstructions.png",
         "latent.png", "curves.png"])
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert list(tmp_path.iterdir()) == [out]  # no second run folder from rank 1
    result = evaluate_run(load_run(out), num_samples=100)
    assert result["test_elbo"] < 0


@pytest.mark.slow
def test_a_killed_worker_ends_the_job_with_an_error_not_a_hang(tmp_path):
    t0 = time.time()
    p = _torchrun(str(HERE / "ddp_script.py"), str(tmp_path / "x.pt"), "8", "kill", timeout=180)
    assert p.returncode != 0
    assert time.time() - t0 < 180
    assert not (tmp_path / "x.pt").exists()


def test_half_configured_environment_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert main(["train", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "half-configured" in err and "MASTER_ADDR" in err and "MASTER_PORT" in err
    assert not (tmp_path / "r").exists()
