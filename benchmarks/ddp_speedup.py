"""Data-parallel speed-up: `pyro-vae train` with 1 process vs `torchrun --nproc_per_node N`, same global batch.

The epoch time is read from metrics.jsonl (`seconds`, which excludes start-up and figures). With N processes each
takes batch B/N, so every run does the same optimization steps on the same global minibatches. On a CPU each
process gets cores/N threads.

    python benchmarks/ddp_speedup.py --dataset mnist --data-dir ../shared/data --procs 2
    python benchmarks/ddp_speedup.py --quick
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs, args, cores):
    out = Path(tempfile.mkdtemp(prefix="ddp-")) / "run"
    train = ["train", "--dataset", args.dataset, "--epochs", str(args.epochs), "--batch-size",
             str(args.batch_size // procs), "--z-dim", "20", "--hidden", "400", "--no-progress", "--device",
             args.device, "--out", str(out)] + (["--data-dir", args.data_dir] if args.data_dir else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs))}
    if procs == 1:
        cmd = [sys.executable, "-m", "pyro_vae.cli", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_addr", "127.0.0.1", "--master_port", str(_port()), "-m", "pyro_vae.cli", *train]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"processes": procs, "threads_per_process": max(1, cores // procs),
            "per_process_batch": args.batch_size // procs, "global_batch": args.batch_size,
            "epoch_seconds": min(m["seconds"] for m in metrics), "final_train_loss": metrics[-1]["train_loss"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.dataset = 1, "digits"
    cores = os.cpu_count() or 1
    rows = [run(1, args, cores), run(args.procs, args, cores)]
    base = rows[0]["epoch_seconds"]
    print("| processes | threads each | batch per process | epoch time | speed-up |\n|---|---|---|---|---|")
    for r in rows:
        r["speedup"] = base / r["epoch_seconds"]
        print(f"| {r['processes']} | {r['threads_per_process']} | {r['per_process_batch']} | "
              f"{r['epoch_seconds']:.2f} s | {r['speedup']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
