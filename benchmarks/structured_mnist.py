"""Structured VAEs on MNIST (docs/benchmarks.md, "Structured VAEs"): pyro-vae runs through ``pyro-vae train``.

Runs, each an ordinary run directory trained by the command line (``pyro_vae.cli.main(["train", ...])``) and
resumed from its checkpoint when it exists, so running this again with a larger ``--epochs`` continues:

* ``vae2``, ``iwae2-5``: Burda et al.'s two-layer model, ``--hierarchy 100,50 --activation tanh``, the VAE
  (the default closed-form-where-unbiased ELBO) and IWAE k=5; compared with benchmarks/reference_two_layer.py;
* ``vae2-td``: the same layers with ``--inference top-down`` (the ladder VAE), against ``vae2``; and both with
  the KL warm-up Sønderby et al. (2016) train the ladder with (``--kl-warmup 15``, 10% of the epochs as their
  200 of 2000): ``vae2-td-wu`` against ``vae2-wu``;
* ``vae1``, ``vae1-vamp``: the one-layer 784-200-200-50 tanh VAE with the standard prior and with the VampPrior
  (``--prior vamp --prior-components 500``).

Protocol: Burda et al.'s, batch 100, Adam lr 1e-3, dynamic binarization, 10% of the training set held out,
captured steps (``--compile``). Test NLL: importance sampling with K = 5000 on the first ``--test-points`` test
digits (binarized once with the fixed seed), with its standard error; per latent layer: active units and KL.
Per-point NLLs are saved, so two runs (or a run and the plain reference) are compared *paired* over digits.

    OMP_NUM_THREADS=1 python benchmarks/structured_mnist.py --data-dir ../shared/data --epochs 150 --runs vae2
    python benchmarks/structured_mnist.py --report          # Markdown tables from the saved results
    python benchmarks/structured_mnist.py --quick           # seconds, on the bundled digits (the tests)

Writes benchmarks/results/structured/<run>/ (run directories) and <run>.json (the evaluation).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

TWO_LAYER = ["--hierarchy", "100,50", "--activation", "tanh"]
ONE_LAYER = ["--z-dim", "50", "--hidden", "200,200", "--activation", "tanh"]
RUNS = {  # name: (description, options of pyro-vae train)
    "vae2": ("two-layer VAE (k=1), bottom-up", TWO_LAYER),
    "iwae2-5": ("two-layer IWAE k=5, bottom-up", TWO_LAYER + ["--objective", "iwae", "--num-particles", "5"]),
    "vae2-td": ("two-layer VAE (k=1), top-down", TWO_LAYER + ["--inference", "top-down"]),
    "vae2-td-wu": ("two-layer VAE (k=1), top-down, KL warm-up 15 epochs",
                   TWO_LAYER + ["--inference", "top-down", "--kl-warmup", "15"]),
    "vae2-wu": ("two-layer VAE (k=1), bottom-up, KL warm-up 15 epochs", TWO_LAYER + ["--kl-warmup", "15"]),
    "vae1": ("one-layer VAE, standard prior", ONE_LAYER),
    "vae1-vamp": ("one-layer VAE, VampPrior (500 pseudo-inputs)", ONE_LAYER + ["--prior", "vamp",
                                                                              "--prior-components", "500"]),
}
QUICK = {"--hierarchy": "8,4", "--z-dim": "4", "--hidden": "16", "--prior-components": "5", "--kl-warmup": "1"}
#: Burda et al. (2016), Table 1, two stochastic layers, after 3280 epochs
PAPER_TWO_LAYER = {"vae2": 85.33, "iwae2-5": 83.89, "IWAE k=50": 82.90}


def train_command(name: str, args) -> list[str]:
    options = list(RUNS[name][1])
    if args.quick:
        options = [QUICK.get(options[i - 1], o) if i else o for i, o in enumerate(options)]
    return ["train", *options, "--dataset", args.dataset, *(["--data-dir", args.data_dir] if args.data_dir else []),
            "--epochs", str(args.epochs), "--batch-size", "100", "--lr", "1e-3", "--seed", str(args.seed),
            *(["--compile"] if args.compile else []), "--no-progress", "--out", str(args.out / name)]


def train(name: str, args) -> None:
    from pyro_vae.cli import main as cli
    from pyro_vae.runs import load_run

    run_dir = args.out / name
    if (run_dir / "checkpoint.pt").exists():
        if load_run(run_dir).epoch < args.epochs:
            code = cli(["train", "--resume", str(run_dir), "--epochs", str(args.epochs), "--no-progress"])
        else:
            code = 0
    else:
        command = train_command(name, args)
        print("pyro-vae " + " ".join(command), flush=True)
        code = cli(command)
    if code:
        raise SystemExit(f"pyro-vae train failed for {name} (exit code {code})")


def evaluate(name: str, args) -> dict:
    from pyro_vae import evaluation
    from pyro_vae.data import prepare_eval_data
    from pyro_vae.runs import load_run
    from pyro_vae.training import module_dtype

    run = load_run(args.out / name)
    vae = run.vae.eval()
    data = run.load_data()
    x = prepare_eval_data(vae, data.x_test, run.config.binarize)[: args.test_points].to(module_dtype(vae))
    t0 = time.perf_counter()
    torch.manual_seed(12345)
    with torch.no_grad():
        ll = evaluation.log_likelihood(vae.model, vae.guide, (x,), num_samples=args.num_samples, progress=False,
                                       compile=args.compile)
        sites = evaluation.latent_site_statistics(vae.model, vae.guide, (x,))
    nll = -ll
    seconds = [m["seconds"] for m in run.metrics if "seconds" in m]
    result = {"run": name, "description": RUNS[name][0], "command": "pyro-vae " + " ".join(train_command(name, args)),
              "epochs": run.epoch, "num_test": int(x.shape[0]), "num_samples": args.num_samples,
              "test_nll": float(nll.mean()), "test_nll_stderr": float(nll.std() / math.sqrt(len(nll))),
              "latent_sites": {s: {"active_units": v["active_units"], "dims": v["dims"],
                                   "kl": (None if v["kl_per_dimension"] is None else
                                          float(torch.tensor(v["kl_per_dimension"]).nansum()))}
                               for s, v in sites.items()},
              "median_epoch_seconds": float(torch.tensor(seconds).median()) if seconds else None,
              "eval_seconds": time.perf_counter() - t0, "per_point_nll": [round(v, 4) for v in nll.tolist()],
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "date": time.strftime("%Y-%m-%d")}
    suffix = "-full" if args.full_test else ""  # the whole test set: a file of its own beside the first 2000
    (args.out / f"{name}{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{name}: {run.epoch} epochs, test NLL {result['test_nll']:.2f} +- {result['test_nll_stderr']:.2f}, "
          f"sites {result['latent_sites']}", flush=True)
    return result


def paired(a: list, b: list) -> tuple[float, float]:
    """Mean of a - b over the points both have, and its standard error."""
    d = torch.tensor(a[: len(b)]) - torch.tensor(b[: len(a)])
    return float(d.mean()), float(d.std() / math.sqrt(len(d)))


def report(args) -> str:
    saved = {p.stem: json.loads(p.read_text()) for p in args.out.glob("*.json") if not p.stem.startswith("speed")}
    full = {name[: -len("-full")]: r for name, r in saved.items() if name.endswith("-full")}
    refs = {k: json.loads(p.read_text()) for k, p in
            (("vae2", RESULTS / "reference_two_layer_two_layer_k1_first2000.json"),
             ("iwae2-5", RESULTS / "reference_two_layer_two_layer_k5_first2000.json")) if p.exists()}
    refs = {k: r for k, r in refs.items() if r["settings"]["dataset"] == args.dataset}  # (not the quick runs)
    full_column = "| full test set: pyro-vae, reference " if full else ""
    lines = ["| model | epochs | pyro-vae | plain reference | pyro-vae − reference ± paired s.e. " + full_column +
             "| paper (3280 epochs) |", "|---|---|---|---|---|" + ("---|" if full else "") + "---|"]
    for name in ("vae2", "iwae2-5"):
        if name in saved:
            r, ref = saved[name], refs.get(name)
            diff = "–" if ref is None else "{:+.2f} ± {:.2f}".format(*paired(r["per_point_nll"], ref["per_point_nll"]))
            ref_cell = "–" if ref is None else f"{ref['test_nll_first2000']:.2f} ± {ref['test_nll_first2000_stderr']:.2f} ({ref['epochs']} ep.)"
            ref_full = RESULTS / f"reference_two_layer_{ref['name']}_full.json" if ref else None
            cells = [f"{full[name]['test_nll']:.2f} ± {full[name]['test_nll_stderr']:.2f}" if name in full else "–"]
            if ref_full is not None and ref_full.exists():
                rf = json.loads(ref_full.read_text())
                cells.append(f"{rf['test_nll']:.2f} ± {rf['test_nll_stderr']:.2f}")
                if name in full:
                    cells.append("Δ {:+.2f} ± {:.2f}".format(*paired(full[name]["per_point_nll"], rf["per_point_nll"])))
            lines.append(f"| {r['description']} | {r['epochs']} | {r['test_nll']:.2f} ± {r['test_nll_stderr']:.2f} | "
                         f"{ref_cell} | {diff} | " + (f"{', '.join(cells)} | " if full else "") + f"{PAPER_TWO_LAYER[name]} |")
    lines += ["", "| model | epochs | test NLL | Δ against the first row ± paired s.e. | per layer: active units / KL "
              "| full test set: NLL, Δ ± paired s.e. |", "|---|---|---|---|---|---|"]
    for group in (("vae1", "vae1-vamp"), ("vae2", "vae2-td", "vae2-td-wu", "vae2-wu")):
        base, base_full = saved.get(group[0]), full.get(group[0])
        for name in group:
            if name not in saved:
                continue
            r = saved[name]
            delta = "" if name == group[0] or base is None else "{:+.2f} ± {:.2f}".format(
                *paired(r["per_point_nll"], base["per_point_nll"]))
            layers = ", ".join(f"{s}: {v['active_units']}/{v['dims']}" + ("" if v["kl"] is None else f", {v['kl']:.1f} nats")
                               for s, v in sorted(r["latent_sites"].items()))
            whole = "–"
            if name in full:
                f = full[name]
                whole = f"{f['test_nll']:.2f} ± {f['test_nll_stderr']:.2f}"
                if name != group[0] and base_full is not None:
                    whole += ", Δ {:+.2f} ± {:.2f}".format(*paired(f["per_point_nll"], base_full["per_point_nll"]))
            lines.append(f"| {r['description']} | {r['epochs']} | {r['test_nll']:.2f} ± {r['test_nll_stderr']:.2f} | "
                         f"{delta} | {layers} | {whole} |")
    return "\n".join(lines)


def speed(args) -> list[dict]:
    """(d): seconds per epoch of ``fit(HierarchicalVAE, compile=True)`` against the plain reference's epoch, at k=1
    (the analytic ELBO) and k=5 (IWAE), interleaved: ``fit`` trains ``--reps`` + 1 epochs and after each of its
    epochs a callback times one epoch of the reference (same data, batch 100, fused Adam; denormals flushed for
    both, as ``fit`` does while it trains). The first (capturing, compiling) epoch is left out; the ratio is the
    median of the per-epoch paired ratios."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import reference_two_layer as ref
    from pyro_vae import HierarchicalVAE, fit
    from pyro_vae.data import load_dataset
    from pyro_vae.training import Callback

    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.data_dir, 0.1, args.seed)
    x = data.x_train
    flat = x.reshape(x.shape[0], -1).contiguous()
    sizes = (8, 4) if args.quick else (100, 50)
    rows = []
    for k in (1, 5):
        torch.manual_seed(0)
        plain = ref.TwoLayerVAE(flat.shape[1], sizes)
        optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3, fused=True)
        generator, plain_seconds = torch.Generator().manual_seed(1), []

        class Interleaved(Callback):
            def on_epoch_end(self, state, metrics):
                t0 = time.perf_counter()
                ref.train_epoch(plain, optimizer, flat, generator, 100, lambda m, xb: ref.loss_fn(m, xb, k, "analytic"))
                plain_seconds.append(time.perf_counter() - t0)

        torch.manual_seed(0)
        model = HierarchicalVAE(data.input_shape, sizes, activation="tanh")
        options = dict(objective="analytic") if k == 1 else dict(objective="iwae", num_particles=5)
        history = fit(model, x, epochs=args.reps + 1, batch_size=100, compile=True, progress=False,
                      callbacks=[Interleaved()], **options)
        ours = [m["seconds"] for m in history[1:]]
        ratios = [a / b for a, b in zip(ours, plain_seconds[1:])]
        rows.append({"k": k, "threads": args.threads, "epochs_timed": len(ours),
                     "captured_s": statistics.median(ours), "reference_s": statistics.median(plain_seconds[1:]),
                     "ratio": statistics.median(ratios), "capture_s": history[0].get("capture_seconds"),
                     "compile_s": history[0].get("compile_seconds")})
        print(rows[-1], flush=True)
    (args.out / f"speed_{args.threads}threads.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-points", type=int, default=2000)
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--full-test", action="store_true", help="evaluate on the whole test set (written to RUN-full.json)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--out", type=Path, default=RESULTS / "structured")
    p.add_argument("--report", action="store_true", help="only print the tables of the saved results")
    p.add_argument("--speed", action="store_true", help="only (d): epoch times, captured against the reference")
    p.add_argument("--reps", type=int, default=5, help="--speed: timed epochs")
    p.add_argument("--threads", type=int, default=1, help="--speed: torch threads")
    p.add_argument("--quick", action="store_true", help="digits, 1 epoch, tiny networks, K=20, 50 test points")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.epochs, args.num_samples, args.test_points, args.compile = "digits", 1, 20, 50, False
    if args.full_test:
        args.test_points = None
    names = [n.strip() for n in args.runs.split(",")]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        p.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.speed:
        return speed(args)
    if not args.report:
        for name in names:
            train(name, args)
            evaluate(name, args)
    table = report(args)
    print(table)
    return table


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
