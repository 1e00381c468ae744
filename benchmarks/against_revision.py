"""The training step of this checkout against the same step of an earlier revision, side by side in one process.

The earlier revision's ``pyro_vae`` package is extracted with ``git archive`` into a temporary folder and
imported under another name (``pyro_vae_base``), so both run interleaved on the same network (784-400-20 MLP
VAE, Bernoulli likelihood), the same batch and the same fused Adam: several repetitions of ``--steps`` steps,
the median per-step time of each, and the ratio. Used to check that a redesign keeps the speed.

    python benchmarks/against_revision.py --base 730d2f4          # the revision before the particle core
    python benchmarks/against_revision.py --base 730d2f4 --quick  # a smoke run
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.distributions.kl as kl_registry

import pyro

import pyro_vae

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("ELBO (Trace_ELBO)", "elbo", {}), ("analytic KL", "analytic", {}),
        ("IWAE K=5", "iwae", {"num_particles": 5}), ("IWAE K=50", "iwae", {"num_particles": 50}),
        ("IWAE K=5, DReG", "iwae", {"num_particles": 5, "estimator": "dreg"})]


def import_revision(rev: str, name: str = "pyro_vae_base"):
    """The ``pyro_vae`` package of git revision ``rev``, imported as ``name``."""
    archive = subprocess.run(["git", "archive", rev, "pyro_vae"], cwd=ROOT, check=True, capture_output=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="pyro-vae-base-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "pyro_vae"
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    registry = dict(kl_registry._KL_REGISTRY)  # the earlier revision registers its own copies of our KL pairs:
    spec.loader.exec_module(module)            # keep this checkout's functions in torch's registry
    kl_registry._KL_REGISTRY.clear()
    kl_registry._KL_REGISTRY.update(registry)
    kl_registry._KL_MEMOIZE.clear()
    return module


def _base_step(base, vae, objective):
    """The earlier revision's trainer step: ``train_step`` with its ``_ObjectiveLoss`` (before the particle
    core) or ``guarded_step`` with its ``ObjectiveModule`` (after), both with the fused Adam."""
    training = importlib.import_module(f"{base.__name__}.training")
    if not hasattr(training, "ObjectiveModule"):
        loss_fn = training._ObjectiveLoss(vae, objective)
        params = list(vae.parameters())
        opt = training.make_adam(params, 1e-4, torch.device("cpu"))
        return lambda x: training.train_step(loss_fn, opt, params, (x,), "check")
    return _step(training, vae, objective)


def _step(training, vae, objective):
    module = training.ObjectiveModule(vae, objective)
    opt = training.make_adam(list(vae.parameters()), 1e-4, torch.device("cpu"))
    state = training.TrainState(vae, module.objective, opt, module, torch.Generator(), torch.device("cpu"))
    return lambda x: training.guarded_step(state, (x,), "check")


def _ms_per_step(step, x, steps):
    t = time.perf_counter()
    for _ in range(steps):
        step(x)
    return (time.perf_counter() - t) / steps * 1e3


def bench_row(base, name, objective, options, batch, steps, reps):
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(batch, 1, 28, 28) * 0.4)
    new_vae = pyro_vae.VAE(input_shape=(1, 28, 28), z_dim=20, hidden=(400,))
    old_vae = base.VAE(input_shape=(1, 28, 28), z_dim=20, hidden=(400,))
    old_vae.load_state_dict(new_vae.state_dict())
    old_objective = importlib.import_module(f"{base.__name__}.objectives").make_objective(objective, **options)
    steps_fn = {"new": _step(pyro_vae.training, new_vae, pyro_vae.make_objective(objective, **options)),
                "base": _base_step(base, old_vae, old_objective)}
    times = {k: [] for k in steps_fn}
    with pyro.validation_enabled(False):
        for f in steps_fn.values():
            _ms_per_step(f, x, max(3, steps // 5))
        for _ in range(reps):
            for key, f in steps_fn.items():
                times[key].append(_ms_per_step(f, x, steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"row": name, "batch": batch, "base_ms": med["base"], "new_ms": med["new"],
            "new_over_base": med["new"] / med["base"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="730d2f4", help="the earlier revision")
    p.add_argument("--batches", default="20,128")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/against_revision.json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.reps, args.batches = 2, 1, "8"
    torch.set_num_threads(args.threads)
    base = import_revision(args.base)
    rows = [bench_row(base, name, objective, options, int(b), args.steps, args.reps)
            for b in args.batches.split(",") for name, objective, options in ROWS]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows},
                                         indent=2))
    print(f"| row | batch | {args.base} ms | this checkout ms | ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['batch']} | {r['base_ms']:.2f} | {r['new_ms']:.2f} | {r['new_over_base']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
