"""The ablation behind benchmarks/results/burda_ablation.md: which pyro-vae default costs nats on Burda et al.'s
one-layer MNIST setup (784-200-200-50 tanh, Bernoulli, dynamic binarization, batch 100, Adam lr 1e-3).

Runs benchmarks/reference_burda.py (and benchmarks/burda_pyro_vae.py for pyro-vae itself) one process at a
time, skipping results that already exist, then prints a Markdown table with paired differences: every run is
evaluated on the same test digits with the same noise seed, so the per-point NLL difference of two runs gives
the standard error of their difference.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/burda_ablation.py run screen --data-dir /work/shared/data
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/burda_ablation.py run confirm iwae seed confirm-ref \\
        iwae-confirm --data-dir /work/shared/data
    python benchmarks/burda_ablation.py plan screen confirm iwae seed confirm-ref iwae-confirm   # command lines
    python benchmarks/burda_ablation.py report screen confirm iwae seed confirm-ref iwae-confirm

Factors (pyro-vae's default first): decoder output bias zero | data-mean, Adam eps 1e-8 | 1e-4, scale softplus |
exp, KL mc | analytic. "A" is the pyro-vae-like setting, "B" a typical reference script's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

A = {"output-bias": "zero", "adam-eps": "1e-8", "scale-param": "softplus", "kl": "mc"}
B = {"output-bias": "data-mean", "adam-eps": "1e-4", "scale-param": "exp", "kl": "analytic"}
SHORT = {"output-bias": "bias", "adam-eps": "eps", "scale-param": "scale", "kl": "kl"}


def ref(name, settings, **extra):
    return (name, "reference", {**settings, **{k.replace("_", "-"): str(v) for k, v in extra.items()}})


def one_at_a_time(prefix, base, other, epochs, k, samples):
    runs = [ref(f"{prefix}_A", base, epochs=epochs, num_samples=samples, k=k)]
    for f in base:
        runs.append(ref(f"{prefix}_A+{SHORT[f]}", {**base, f: other[f]}, epochs=epochs, num_samples=samples, k=k))
    return runs


def plan(stage: str) -> list:
    if stage == "screen":  # 50 epochs, K = 1000 (screening), seed 0
        e, s = 50, 1000
        runs = [ref("s50_A", A, epochs=e, num_samples=s), ref("s50_B", B, epochs=e, num_samples=s),
                ("s50_pyrovae", "pyro-vae", {"epochs": str(e), "num-samples": str(s)})]
        runs += one_at_a_time("s50", A, B, e, 1, s)[1:]
        runs += [ref(f"s50_B-{SHORT[f]}", {**B, f: A[f]}, epochs=e, num_samples=s) for f in B]
        return runs
    if stage == "confirm":  # 150 epochs, K = 5000, the user's protocol; pyro-vae itself with and without the fix
        e, s = "150", "5000"
        pv = {"epochs": e, "num-samples": s, "no-pyro-eval": None}
        return [("c150_pyrovae", "pyro-vae", pv),
                ("c150_pyrovae+bias", "pyro-vae", {**pv, "output-bias": "data-mean"}),
                ("c150_pyrovae+bias+analytic", "pyro-vae", {**pv, "output-bias": "data-mean", "objective": "analytic"}),
                ref("c150_B", B, epochs=e, num_samples=s)]
    if stage == "iwae":  # IWAE k=5 (the KL factor does not apply), 50 epochs
        e, s = 50, 1000
        return [ref("i50_A", A, epochs=e, num_samples=s, k=5),
                ref("i50_A+bias", {**A, "output-bias": "data-mean"}, epochs=e, num_samples=s, k=5)]
    if stage == "seed":  # a second seed of the endpoints and the single winner: seed-to-seed noise
        e, s = 50, 1000
        return [ref("s50_A_seed1", A, epochs=e, num_samples=s, seed=1),
                ref("s50_A+bias_seed1", {**A, "output-bias": "data-mean"}, epochs=e, num_samples=s, seed=1),
                ref("s50_A+kl_seed1", {**A, "kl": "analytic"}, epochs=e, num_samples=s, seed=1),
                ref("s50_B_seed1", B, epochs=e, num_samples=s, seed=1)]
    if stage == "iwae-confirm":  # pyro-vae itself, IWAE k=5, 150 epochs, with and without the output-bias fix
        pv = {"epochs": "150", "num-samples": "5000", "no-pyro-eval": None, "k": "5"}
        return [("c150_pyrovae_iwae5", "pyro-vae", pv),
                ("c150_pyrovae_iwae5+bias", "pyro-vae", {**pv, "output-bias": "data-mean"})]
    if stage == "confirm-ref":  # the reference with pyro-vae-like settings at 150 epochs
        return [ref("c150_A", A, epochs=150, num_samples=5000)]
    if stage == "iwae-confirm-ref":  # the reference script's choices, IWAE k=5, 150 epochs
        return [ref("c150_B_iwae5", B, epochs=150, num_samples=5000, k=5)]
    raise SystemExit(f"unknown stage {stage!r}")


def result_path(name):
    return RESULTS / f"reference_burda_{name}.json"


def command(name, kind, opts, data_dir):
    script = "reference_burda.py" if kind == "reference" else "burda_pyro_vae.py"
    cmd = [sys.executable, str(HERE / script), "--data-dir", data_dir, "--name", name]
    if kind == "reference":
        cmd.append("--save-model")
    for k, v in opts.items():
        cmd += [f"--{k}"] + ([] if v is None else [v])
    return cmd


def run(stages, data_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for stage in stages:
        for name, kind, opts in plan(stage):
            if result_path(name).exists():
                continue
            cmd = command(name, kind, opts, data_dir)
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, env=env)


def paired(a, b):
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    m = sum(d) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1))
    return m, sd / math.sqrt(n)


def describe(r):
    s = r["settings"]
    if "scale_param" not in s:
        extra = ", output bias data-mean" if s.get("output_bias") == "data-mean" else ""
        return f"pyro-vae fit (--objective {s.get('objective') or 'elbo'}{extra})"
    parts = [f"bias {s['output_bias']}", f"eps {s['adam_eps']:g}", s["scale_param"]]
    if s["k"] == 1:
        parts.append(f"KL {s['kl']}")
    return ", ".join(parts)


def report(stages):
    for stage in stages:
        runs = [(n, json.loads(result_path(n).read_text())) for n, _, _ in plan(stage) if result_path(n).exists()]
        if not runs:
            continue
        base_name, base = runs[0]
        print(f"\n### {stage}: difference against {base_name}\n")
        print("| run | setting | epochs | K | test NLL ± s.e. | Δ NLL vs " + base_name + " ± paired s.e. | "
              "test ELBO | active units | final train loss | s/epoch |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, r in runs:
            d, se = paired(r["per_point_nll"], base["per_point_nll"])
            print(f"| {name} | {describe(r)} | {len(r['history'])} | {r['num_samples']} | "
                  f"{r['test_nll']:.2f} ± {r['test_nll_stderr']:.2f} | {d:+.2f} ± {se:.2f} | {r['test_elbo']:.2f} | "
                  f"{r.get('active_units', '–')} | "
                  f"{r['history'][-1]['train_loss']:.2f} | {r['seconds_per_epoch']:.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=["run", "report", "plan", "diff"],
                   help="diff RUN_A RUN_B [RUN_C RUN_D ...]: paired NLL differences of result names, two at a time")
    p.add_argument("stages", nargs="+")
    p.add_argument("--data-dir", default="/work/shared/data")
    a = p.parse_args(argv)
    if a.action == "run":
        run(a.stages, a.data_dir)
    elif a.action == "plan":
        for stage in a.stages:
            for name, kind, opts in plan(stage):
                print(" ".join(command(name, kind, opts, a.data_dir)[1:]))
    elif a.action == "diff":
        for x, y in zip(a.stages[::2], a.stages[1::2]):
            rx, ry = (json.loads(result_path(n).read_text()) for n in (x, y))
            d, se = paired(rx["per_point_nll"], ry["per_point_nll"])
            print(f"{x} - {y}: {d:+.3f} ± {se:.3f} nats (paired s.e., {len(rx['per_point_nll'])} test points)")
    else:
        report(a.stages)


if __name__ == "__main__":
    main()
