"""Semi-supervised MNIST with M2 (docs/benchmarks.md, "Semi-supervised M2"): test error with 100, 600, 1000 and
3000 labels, beside Kingma, Rezende, Mohamed & Welling (NeurIPS 2014), Table 1, column "M2", and beside the
classifier q(y|x)'s architecture trained on the same labels alone.

Each run ``m2-l<N>-s<S>`` (N labels, label draw S) is an ordinary run directory under ``--out`` trained by the
command line, ``pyro-vae train --semi-supervised --labels N --label-seed S ...``, and resumed from its checkpoint
(``pyro-vae train --resume RUN --epochs E``) when it exists: running this again with a larger ``--epochs``
continues every run in a later sitting. After training, per run:

* M2's ``test_error`` (argmax_y q(y|x) on the whole test set, the last epoch's weights; ``evaluate_run`` with
  ``num_samples=0``: no importance-sampled NLL) with its binomial standard error, and the test bound U(x);
* the supervised-only baseline: q(y|x)'s architecture trained by cross-entropy on the run's own labelled points
  (``RUN_DIR/labels.json``) alone, full batches, its step chosen on the validation labels
  (``supervised_baseline`` of examples/semi_supervised.py, which also gets every validation label: an advantage
  M2 does not have);
* the paired difference, M2's error minus the baseline's, as the mean over test digits of
  1[M2 wrong] - 1[baseline wrong], with its standard error over the digits;
* the epochs done and the training wall time (the sum of the epochs' ``seconds`` in metrics.jsonl).

Architecture, as close to Kingma et al.'s M2 for MNIST as the command line offers: q(z|x,y), p(x|y,z) and q(y|x)
are MLPs with one hidden layer of 500 softplus units, z has 50 dimensions (``--z-dim 50 --hidden 500 --activation
softplus``), Bernoulli likelihood, p(y) uniform, p(z) = N(0, I), the command line's auxiliary weight 46 per labelled
point (``--aux-weight``; Kingma et al.'s alpha = 0.1 N is 0.1 N / N_l per labelled point). What differs from the
paper:

* the split: 54 000 training and 6 000 validation digits (``val_fraction`` 0.1) where the paper has 50 000 and
  10 000; grey digits binarized afresh every epoch (test digits once, with a fixed seed);
* q(z|x,y) is a diagonal Gaussian whose mean *and* scale read (x, y) (the paper's scale reads x alone);
* labelled minibatches alternate with unlabelled ones (``--unlabelled-per-labelled K``, default 10), which
  weights the labelled points more than the paper's sum over the data does (docs/semi-supervised.md);
* the optimizer is pyro-vae's Adam (``--lr``, batch ``--batch-size``), PyTorch's initialization with the
  decoder's output bias at the logit of the mean pixel; the paper's optimizer settings and its (much longer)
  training are not reproduced: the epochs done are stated beside every number;
* the spread is over label draws only (``--label-seed``); the weights, the data order and the validation split
  keep ``--seed`` in every run.

    python benchmarks/semi_supervised_mnist.py --data-dir ../shared/data --labels 100,600,1000,3000 \\
        --seeds 0,1,2 --epochs 10          # again with --epochs 20 continues the same runs
    python benchmarks/semi_supervised_mnist.py --report      # the Markdown table from the saved results
    python benchmarks/semi_supervised_mnist.py --quick       # seconds, on the bundled 8x8 digits (the tests)

Writes ``--out``/m2-l<N>-s<S>/ (run directories) and ``--out``/m2-l<N>-s<S>.json (the evaluation).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: Kingma et al. (2014), Table 1, column "M2": test error in percent, mean ± spread over label draws
PAPER_M2 = {100: (11.97, 1.71), 600: (4.94, 0.13), 1000: (3.60, 0.56), 3000: (3.92, 0.63)}
ARCHITECTURE = {"z_dim": 50, "hidden": 500, "activation": "softplus"}
QUICK_ARCHITECTURE = {"z_dim": 4, "hidden": 16, "activation": "softplus"}
DEFAULTS = dict(dataset="mnist", labels="100,600,1000,3000", seeds="0,1,2", epochs=10, lr=1e-3, baseline_steps=500,
                baseline_lr=1e-3, out=RESULTS / "semi_supervised")
QUICK = dict(dataset="digits", labels="30", seeds="0,1", epochs=2, lr=1e-2, baseline_steps=50, baseline_lr=1e-2,
             out=RESULTS / "semi_supervised_quick")


def run_name(labels: int, seed: int) -> str:
    return f"m2-l{labels}-s{seed}"


def _load_example():
    """examples/semi_supervised.py, for its ``supervised_baseline``."""
    spec = importlib.util.spec_from_file_location("semi_supervised_example", HERE.parent / "examples" /
                                                  "semi_supervised.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- training
def train_options(labels: int, seed: int, args) -> dict:
    """The RunConfig fields a run is trained with: what ``train_command`` passes and what a resumed run's
    config.json must hold."""
    arch = QUICK_ARCHITECTURE if args.quick else ARCHITECTURE
    options = dict(dataset=args.dataset, semi_supervised=True, labels=labels, label_seed=seed, z_dim=arch["z_dim"],
                   hidden=[arch["hidden"]], activation=arch["activation"], batch_size=args.batch_size, lr=args.lr,
                   seed=args.seed, unlabelled_per_labelled=args.unlabelled_per_labelled)
    if args.aux_weight is not None:
        options["aux_weight"] = args.aux_weight
    return options


def train_command(labels: int, seed: int, args) -> list[str]:
    """``pyro-vae train`` arguments of run (labels, seed)."""
    o = train_options(labels, seed, args)
    return ["train", "--semi-supervised", "--labels", str(labels), "--label-seed", str(seed),
            "--dataset", o["dataset"], *(["--data-dir", args.data_dir] if args.data_dir else []),
            "--z-dim", str(o["z_dim"]), "--hidden", ",".join(map(str, o["hidden"])), "--activation", o["activation"],
            *(["--aux-weight", str(args.aux_weight)] if args.aux_weight is not None else []),
            "--unlabelled-per-labelled", str(args.unlabelled_per_labelled), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
            "--device", args.device, "--no-progress", "--out", str(args.out / run_name(labels, seed))]


def train(labels: int, seed: int, args) -> None:
    """Train run (labels, seed) to ``args.epochs`` epochs through the command line: a new run, or the existing
    one resumed (its config.json must describe the same run)."""
    from pyro_vae.cli import main as cli
    from pyro_vae.runs import load_run

    run_dir = args.out / run_name(labels, seed)
    if (run_dir / "config.json").exists():
        config = json.loads((run_dir / "config.json").read_text())
        differ = {k: (config.get(k), v) for k, v in train_options(labels, seed, args).items() if config.get(k) != v}
        if differ:
            raise SystemExit(f"{run_dir} was trained with other settings ("
                             + ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in differ.items())
                             + "): choose another --out")
        done = load_run(run_dir).epoch if (run_dir / "checkpoint.pt").exists() else 0
        command = ["train", "--resume", str(run_dir), "--epochs", str(args.epochs), "--device", args.device,
                   "--no-progress"] if done < args.epochs else None
    else:
        command = train_command(labels, seed, args)
    if command is None:
        return
    if not args.quiet:
        print("pyro-vae " + " ".join(command), flush=True)
    code = cli(command)
    if code:
        raise SystemExit(f"pyro-vae train failed for {run_dir} (exit code {code})")


# ---------------------------------------------------------------------------------------------- evaluation
def paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Mean of a - b over the points (a and b per point, the same points) and its standard error."""
    d = (a - b).double()
    return {"mean": float(d.mean()), "stderr": float(d.std() / math.sqrt(len(d)))}


def evaluate(labels: int, seed: int, args) -> dict:
    """M2's test error (evaluate_run), the supervised-only baseline on the run's labelled points and the paired
    difference over the test digits; written to ``--out``/<run>.json."""
    from pyro_vae.data import needs_binarization, prepare_eval_data
    from pyro_vae.runs import evaluate_run, load_run

    name = run_name(labels, seed)
    run = load_run(args.out / name)
    saved = args.out / f"{name}.json"
    if saved.exists():  # already evaluated at this epoch with this baseline: keep it
        old = json.loads(saved.read_text())
        if old.get("epochs") == run.epoch and old.get("baseline_steps") == args.baseline_steps and \
                old.get("baseline_lr") == args.baseline_lr and "best" in old:
            return old
    config, data = run.config, run.load_data()
    t0 = time.perf_counter()
    result = evaluate_run(run, num_samples=0, device=args.device, write=True)
    eval_seconds = time.perf_counter() - t0

    record = json.loads((run.dir / "labels.json").read_text())
    chosen = torch.tensor(record["indices"])
    vae = run.vae.cpu().eval()
    x_val = prepare_eval_data(vae, data.x_val, config.binarize)
    x_test = prepare_eval_data(vae, data.x_test, config.binarize)  # the digits evaluate_run scored
    dynamic = needs_binarization(vae.likelihood, data.x_train, config.binarize)
    t0 = time.perf_counter()
    baseline = _load_example().supervised_baseline(
        data.input_shape, data.num_classes, tuple(config.hidden), data.x_train[chosen], data.y_train[chosen], x_val,
        data.y_val, steps=args.baseline_steps, lr=args.baseline_lr, dynamic=dynamic, activation=config.activation)
    baseline_seconds = time.perf_counter() - t0
    with torch.no_grad():
        m2_wrong = (vae.classify(x_test) != data.y_test).double()
        baseline_wrong = (baseline(x_test).argmax(-1) != data.y_test).double()
    if abs(float(m2_wrong.mean()) - result["test_error"]) > 1e-12:  # the same digits and weights as evaluate_run
        raise RuntimeError(f"{name}: M2's test error {float(m2_wrong.mean())} differs from evaluate_run's "
                           f"{result['test_error']}")
    n = len(baseline_wrong)
    baseline_error = float(baseline_wrong.mean())
    best = best_checkpoint(args.out / name, x_test, data.y_test, baseline_wrong)
    seconds = [m["seconds"] for m in run.metrics if "seconds" in m]
    out = {"run": name, "labels": labels, "label_seed": seed, "seed": config.seed, "dataset": config.dataset,
           "epochs": run.epoch, "train_seconds": sum(seconds),
           "median_epoch_seconds": statistics.median(seconds) if seconds else None,
           "aux_weight": config.aux_weight, "unlabelled_per_labelled": config.unlabelled_per_labelled,
           "val_error": run.metrics[-1].get("val_error") if run.metrics else None,
           "num_test": n, "test_error": result["test_error"], "test_error_stderr": result["test_error_stderr"],
           "test_elbo": result["test_elbo"], "baseline_test_error": baseline_error,
           "baseline_test_error_stderr": math.sqrt(baseline_error * (1 - baseline_error) / n),
           "baseline_steps": args.baseline_steps, "baseline_lr": args.baseline_lr,
           "m2_minus_baseline": paired(m2_wrong, baseline_wrong), "best": best,
           "eval_seconds": eval_seconds, "baseline_seconds": baseline_seconds,
           "train_command": "pyro-vae " + " ".join(train_command(labels, seed, args)),
           "driver_command": driver_command(args),
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    saved.write_text(json.dumps(out, indent=1) + "\n")
    if not args.quiet:
        d = out["m2_minus_baseline"]
        print(f"{name}: {run.epoch} epochs, M2 test error {out['test_error']:.4f} ± {out['test_error_stderr']:.4f}, "
              f"labels alone {baseline_error:.4f} (M2 - labels alone {d['mean']:+.4f} ± {d['stderr']:.4f})",
              flush=True)
    return out


def best_checkpoint(run_dir: Path, x_test, y_test, baseline_wrong) -> dict | None:
    """M2 at its epoch of lowest validation error (``best.pt``), the same selection the baseline's step gets
    from the validation labels: its epoch, validation and test error, and the paired difference from the
    baseline."""
    from pyro_vae.runs import BEST, load_run

    if not (run_dir / BEST).exists():
        return None
    run = load_run(run_dir, best=True)
    vae = run.vae.cpu().eval()
    with torch.no_grad():
        wrong = (vae.classify(x_test) != y_test).double()
    error = float(wrong.mean())
    val = [m.get("val_error") for m in run.metrics if m.get("epoch") == run.epoch]
    return {"epoch": run.epoch, "val_error": val[-1] if val else None, "test_error": error,
            "test_error_stderr": math.sqrt(error * (1 - error) / len(wrong)),
            "m2_minus_baseline": paired(wrong, baseline_wrong)}


def driver_command(args) -> str:
    """This script's command line as it was given, with the grid's --labels, --seeds and --epochs."""
    given, skip = [], False
    for a in args.argv:
        if skip or a.split("=")[0] in ("--labels", "--seeds", "--epochs"):
            skip = not skip and "=" not in a
            continue
        given.append(a)
    return shlex.join(["python", "benchmarks/semi_supervised_mnist.py", *given, "--labels", args.labels,
                       "--seeds", args.seeds, "--epochs", str(args.epochs)])


# ---------------------------------------------------------------------------------------------- the table
def _percent(values: list[float], stderr: float | None = None) -> str:
    """mean ± standard deviation over draws (in percent); one draw: its value ± its standard error."""
    if len(values) > 1:
        return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"
    return f"{100 * values[0]:.2f}" + ("" if stderr is None else f" (± {100 * stderr:.2f} s.e.)")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min" if seconds < 3600 else \
        f"{seconds / 3600:.2f} h"


def _selected(r: dict) -> dict:
    """The run's M2 at its lowest-validation-error epoch (``best.pt``), or at its last epoch when it has none."""
    return r.get("best") or {"epoch": r["epochs"], "val_error": r["val_error"], "test_error": r["test_error"],
                             "test_error_stderr": r["test_error_stderr"], "m2_minus_baseline": r["m2_minus_baseline"]}


def report(out: Path) -> str:
    """Markdown: per label count, M2's and the baseline's test error (mean ± s.d. over label draws), the paper's
    M2 column, epochs and training time; then one row per run with the paired difference."""
    rows = sorted((json.loads(p.read_text()) for p in Path(out).glob("m2-l*-s*.json")),
                  key=lambda r: (r["labels"], r["label_seed"]))
    if not rows:
        return f"no results in {out}: run the benchmark first"
    by_labels: dict[int, list] = {}
    for r in rows:
        by_labels.setdefault(r["labels"], []).append(r)
    commands = sorted({r["driver_command"] for r in rows})
    lines = ["```bash", *commands, "# each run, e.g.:", rows[0]["train_command"], "```", "",
             "| labels | label draws | M2 test error %, lowest-validation-error epoch | M2, last epoch | "
             "labels alone % | M2 (selected) − labels alone % (paired) | Kingma et al. M2 % | epochs | "
             "train time per run |", "|---|---|---|---|---|---|---|---|---|"]
    for n, group in by_labels.items():
        one = group[0] if len(group) == 1 else None
        chosen = [_selected(r) for r in group]
        paper = PAPER_M2.get(n)
        epochs = sorted({r["epochs"] for r in group})
        minutes = [r["train_seconds"] / 60 for r in group]
        lines.append(
            f"| {n} | {len(group)} | {_percent([c['test_error'] for c in chosen], one and chosen[0]['test_error_stderr'])} | "
            f"{_percent([r['test_error'] for r in group], one and one['test_error_stderr'])} | "
            f"{_percent([r['baseline_test_error'] for r in group], one and one['baseline_test_error_stderr'])} | "
            f"{_percent([c['m2_minus_baseline']['mean'] for c in chosen], one and chosen[0]['m2_minus_baseline']['stderr'])} | "
            f"{'–' if paper is None else f'{paper[0]:.2f} ± {paper[1]:.2f}'} | "
            f"{'–'.join(map(str, [epochs[0], epochs[-1]] if len(epochs) > 1 else epochs))} | "
            f"{_duration(60 * statistics.mean(minutes))} |")
    lines += ["", "| run | epochs | train time | s per epoch | selected epoch (val error) | M2 test error, selected | "
              "M2, last epoch | labels alone | M2 (selected) − labels alone ± paired s.e. |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = _selected(r)
        d = c["m2_minus_baseline"]
        val = "–" if c.get("val_error") is None else f"{c['val_error']:.4f}"
        per_epoch = "–" if r["median_epoch_seconds"] is None else f"{r['median_epoch_seconds']:.1f}"
        lines.append(f"| {r['run']} | {r['epochs']} | {_duration(r['train_seconds'])} | {per_epoch} | "
                     f"{c.get('epoch', r['epochs'])} ({val}) | {c['test_error']:.4f} ± {c['test_error_stderr']:.4f} | "
                     f"{r['test_error']:.4f} ± {r['test_error_stderr']:.4f} | {r['baseline_test_error']:.4f} ± "
                     f"{r['baseline_test_error_stderr']:.4f} | {d['mean']:+.4f} ± {d['stderr']:.4f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def _ints(text: str, what: str, low: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--{what}: expected comma-separated integers like 100,600, got {text!r}") from None
    if not values or min(values) < low or len(set(values)) != len(values):
        raise SystemExit(f"--{what}: expected distinct integers >= {low}, got {text!r}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None, help="default mnist (--quick: digits)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--labels", default=None, help="comma-separated label counts (default 100,600,1000,3000)")
    p.add_argument("--seeds", default=None, help="comma-separated label draw seeds (--label-seed; default 0,1,2)")
    p.add_argument("--epochs", type=int, default=None, help="the total epochs of every run (default 10); a larger "
                                                            "value continues the existing runs")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default 1e-3; --quick: 1e-2)")
    p.add_argument("--aux-weight", type=float, default=None, help="default the command line's (46)")
    p.add_argument("--unlabelled-per-labelled", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and the split")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--baseline-steps", type=int, default=None, help="full-batch steps of the supervised-only "
                                                                    "classifier (default 500)")
    p.add_argument("--baseline-lr", type=float, default=None, help="the baseline's Adam learning rate (default "
                                                                   "1e-3; --quick: 1e-2)")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/semi_supervised "
                                                          "(--quick: semi_supervised_quick)")
    p.add_argument("--report", action="store_true", help="print the table of the saved results and stop")
    p.add_argument("--quick", action="store_true", help="the 8x8 digits, tiny networks, 30 labels, draws 0 and 1, "
                                                        "2 epochs (the tests)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 1 or args.baseline_steps < 1:
        p.error("--epochs and --baseline-steps must be at least 1")
    return args


def main(argv=None) -> dict:
    """Train and evaluate the grid (or with --report only read it); returns {"rows": [...], "report": str}."""
    args = parse_args(argv)
    args.out = Path(args.out)
    if not args.report:
        labels, seeds = _ints(args.labels, "labels", 1), _ints(args.seeds, "seeds", 0)
        args.out.mkdir(parents=True, exist_ok=True)
        rows = []
        for n in labels:
            for s in seeds:
                train(n, s, args)
                rows.append(evaluate(n, s, args))
    else:
        rows = [json.loads(p.read_text()) for p in sorted(args.out.glob("m2-l*-s*.json"))]
    table = report(args.out)
    print(table)
    return {"rows": rows, "report": table}


if __name__ == "__main__":
    main()
