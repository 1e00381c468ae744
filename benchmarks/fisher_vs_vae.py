"""The Fisher auto-encoder against the VAE, on the same data, network and budget (an honest comparison).

Both are trained by `train_run` (same seed, epochs, batch size, learning rate, networks) and evaluated by the
same importance-sampled test NLL (K samples from each model's own encoder) and test ELBO; the sample grids are
written beside each other.

    python benchmarks/fisher_vs_vae.py                  # digits, about 2 minutes on 2 CPU cores
    python benchmarks/fisher_vs_vae.py --quick
"""
import argparse
import json
import shutil
import time
from pathlib import Path

from pyro_vae import RunConfig, evaluate_run, load_run, train_run
from pyro_vae.plots import draw_run_figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--out", default="benchmarks/results/fisher_vs_vae")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.num_samples = 1, 20
    out = Path(args.out)
    rows = []
    for objective in ("elbo", "fisher"):
        run_dir = out / objective
        if run_dir.exists():
            shutil.rmtree(run_dir)
        config = RunConfig(dataset=args.dataset, data_dir=args.data_dir, objective=objective, z_dim=8,
                           hidden=(256,), epochs=args.epochs, batch_size=64, lr=1e-3, seed=0)
        t0 = time.time()
        train_run(config, run_dir, progress=False)
        seconds = time.time() - t0
        draw_run_figures(load_run(run_dir))
        r = evaluate_run(load_run(run_dir), num_samples=args.num_samples)
        rows.append({"objective": objective, "train_seconds": seconds, **r})
    print("| objective | epochs | train time | test NLL (IS) | test ELBO | active units | samples |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {args.epochs} | {r['train_seconds']:.0f} s | {r['test_nll']:.2f} ± "
              f"{r['test_nll_stderr']:.2f} | {r['test_elbo']:.2f} | {r['active_units']} | "
              f"{out / r['objective'] / 'samples.png'} |")
    (out / "fisher_vs_vae.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
