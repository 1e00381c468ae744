"""Burda et al. (2015), Table 1, one stochastic layer, on MNIST: VAE vs IWAE k=5 vs IWAE k=50 (and DReG).

Architecture 784-200-200-50 with tanh, Bernoulli likelihood, dynamic binarization, Adam; test NLL estimated by
importance sampling with K=5000. The paper trains 3280 epochs; on a small CPU we run the longest schedule that
fits and report epochs and wall time. Every model is an ordinary pyro-vae run directory, so the runner resumes
from the checkpoints: run it again (with the same or a larger --epochs) to continue in a later sitting.

    python benchmarks/iwae_table.py --data-dir ../shared/data --epochs 10 --test-points 1000
    python benchmarks/iwae_table.py --quick          # a tiny smoke run (what the tests execute)

Writes benchmarks/results/iwae_table.json and prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pyro_vae import RunConfig, evaluate_run, load_run, resume_run, train_run

PAPER = {"VAE": 86.76, "IWAE k=5": 85.54, "IWAE k=50": 84.78}
# the paper's active units (one stochastic layer, Table 1): VAE k=1: 19, IWAE k=5: 22, IWAE k=50: 25
PAPER_ACTIVE = {"VAE": 19, "IWAE k=5": 22, "IWAE k=50": 25}

MODELS = [  # key for --models, name in the table, run options
    ("vae", "VAE", dict(objective="analytic")),  # pyro-vae's default objective
    ("iwae5", "IWAE k=5", dict(objective="iwae", num_particles=5, estimator="iwae")),
    ("iwae50", "IWAE k=50", dict(objective="iwae", num_particles=50, estimator="iwae")),
    ("dreg50", "IWAE k=50, DReG", dict(objective="iwae", num_particles=50, estimator="dreg")),
]


def config_for(overrides: dict, args) -> RunConfig:
    return RunConfig(dataset=args.dataset, data_dir=args.data_dir, z_dim=50, hidden=(200, 200), activation="tanh",
                     likelihood="bernoulli", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     seed=args.seed, device=args.device, checkpoint_every=1, **overrides)


def run_one(name, overrides, args, out_root: Path) -> dict:
    run_dir = out_root / name.replace(" ", "_").replace("=", "").replace(",", "")
    config = config_for(overrides, args)
    t0 = time.time()
    if (run_dir / "checkpoint.pt").exists():
        done = load_run(run_dir).epoch
        if done < args.epochs:
            resume_run(run_dir, epochs=args.epochs, progress=not args.quiet)
    else:
        train_run(config, run_dir, progress=not args.quiet)
    train_s = time.time() - t0
    run = load_run(run_dir)
    run_train_s = sum(m["seconds"] for m in run.metrics)
    t1 = time.time()
    result = evaluate_run(run, num_samples=args.num_samples, max_points=args.test_points, device=args.device,
                          progress=not args.quiet)
    return {"model": name, "epochs": run.epoch, "train_seconds": run_train_s, "this_sitting_seconds": train_s,
            "eval_seconds": time.time() - t1, **{k: result[k] for k in
                                                 ("test_nll", "test_nll_stderr", "test_elbo", "active_units",
                                                  "num_test", "num_samples")}}


def markdown(rows) -> str:
    lines = ["| model | epochs | train time | test NLL (ours) | ± s.e. | test ELBO | active units | NLL (paper, 3280 epochs) | active (paper) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = r["model"].split(",")[0]
        lines.append(f"| {r['model']} | {r['epochs']} | {r['train_seconds'] / 60:.1f} min | {r['test_nll']:.2f} | "
                     f"{r['test_nll_stderr']:.2f} | {r['test_elbo']:.2f} | {r['active_units']} | "
                     f"{PAPER.get(key, '')} | {PAPER_ACTIVE.get(key, '')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--test-points", type=int, default=None, help="evaluate on the first N test points")
    p.add_argument("--models", default=",".join(k for k, _, _ in MODELS), help="comma-separated keys")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results/iwae_table")
    p.add_argument("--quick", action="store_true", help="digits, 1 epoch, K=20, 50 test points")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.epochs, args.num_samples, args.test_points = "digits", 1, 20, 50
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    wanted = [m.strip() for m in args.models.split(",")]
    unknown = set(wanted) - {k for k, _, _ in MODELS}
    if unknown:
        p.error(f"unknown model key(s) {', '.join(sorted(unknown))}; choose from {', '.join(k for k, _, _ in MODELS)}")
    rows = [run_one(name, o, args, out_root) for key, name, o in MODELS if key in wanted]
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads", "torch": torch.__version__, "args": vars(args)}
    (out_root / "iwae_table.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
