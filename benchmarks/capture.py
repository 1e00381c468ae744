"""Capture against hand-written PyTorch and Pyro's own SVI: ms per training step, for models written in Pyro.

Each row is one model and objective at one batch size. Each column trains it with the same data, the same
initial weights and **the same optimizer** (torch's fused Adam; Pyro's SVI gets it through
``pyro.optim.PyroOptim(torch.optim.Adam, {"fused": True})``, one Adam per parameter as Pyro does):

* ``hand``: the model's maths written in plain eager PyTorch (no Pyro), the reference;
* ``svi``: ``pyro.infer.SVI`` with Pyro's own estimator (Trace_ELBO; TraceMeanField_ELBO for the analytic KL;
  RenyiELBO(alpha=0) for IWAE, which has no DReG);
* ``jit``: the same with Pyro's JIT variant (JitTrace_ELBO, ...), or the error it gives;
* ``traced``: pyro-vae's objective on Pyro traces, eager (what any user model got before capture);
* ``twin``: for ``pyro_vae.VAE``, its trace-free twin, eager;
* ``captured``: ``fit(compile=True)``'s step: the traced program recorded once into one graph, Inductor.

The rows: a tutorial-style user VAE (784-400-20, its own site names, not ``pyro_vae.VAE``) with the ELBO at
batch 20 and 128, the analytic KL at 128, IWAE-5 with DReG at 20 and IWAE-50 at 128; a two-stochastic-layer
model written as a plain Pyro program (Burda et al.'s 784-200-200-100 / 100-100-50 layers); ``pyro_vae.VAE``
with the Cholesky and IAF guides. Implementations run interleaved in one process: each repetition times
``--steps`` steps of every column in turn; a ratio is the median over repetitions of the per-repetition ratio
to ``hand`` (paired). Capture and compile seconds are the first call's, with an empty Inductor cache (cold)
and again for a fresh capture of the same graph (warm: Inductor's on-disk graph cache).

    python benchmarks/capture.py                    # the table at 1 and 2 threads -> benchmarks/results/capture.json
    python benchmarks/capture.py --device cuda      # on a GPU: the captured step replays as a CUDA graph
    python benchmarks/capture.py --quick            # a smoke run (what the tests execute)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-cold-"))  # a cold cache

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
from pyro.infer import SVI, JitTrace_ELBO, JitTraceMeanField_ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO  # noqa

import pyro_vae  # noqa: E402
from pyro_vae.objectives import AnalyticKLELBO, IWAEELBO, MonteCarloELBO  # noqa: E402
from pyro_vae.training import ObjectiveModule, make_adam  # noqa: E402

D = 784
LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------- the models
class TutorialVAE(nn.Module):
    """Pyro's VAE tutorial, as a user writes it: softplus MLPs, ``latent`` and ``obs`` sites."""

    def __init__(self, z_dim=20, hidden=400):
        super().__init__()
        self.z_dim = z_dim
        self.enc = nn.Sequential(nn.Linear(D, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z_dim))
        self.dec = nn.Sequential(nn.Linear(z_dim, hidden), nn.Softplus(), nn.Linear(hidden, D))

    def encode(self, x):
        loc, raw = self.enc(x).chunk(2, -1)
        return loc, F.softplus(raw) + 1e-4

    def model(self, x):
        pyro.module("dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("enc", self.enc)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("latent", dist.Normal(*self.encode(x)).to_event(1))


def mlp(sizes, out):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], out))


class TwoLayerVAE(nn.Module):
    """x <- z1 <- z2 as a plain Pyro program: p(z2) p(z1|z2) p(x|z1), q(z1|x) q(z2|z1) (Burda et al., 2016)."""

    def __init__(self, z1=100, z2=50):
        super().__init__()
        self.z1, self.z2 = z1, z2
        self.q1, self.q2 = mlp([D, 200, 200], 2 * z1), mlp([z1, 100, 100], 2 * z2)
        self.p1, self.px = mlp([z2, 100, 100], 2 * z1), mlp([z1, 200, 200], D)

    @staticmethod
    def gaussian(out):
        loc, raw = out.chunk(2, -1)
        return loc, F.softplus(raw) + 1e-4

    def model(self, x):
        pyro.module("p1", self.p1)
        pyro.module("px", self.px)
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(self.z2), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(*self.gaussian(self.p1(z2))).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.px(z1)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("q1", self.q1)
        pyro.module("q2", self.q2)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(*self.gaussian(self.q1(x))).to_event(1))
            pyro.sample("z2", dist.Normal(*self.gaussian(self.q2(z1))).to_event(1))


def normal_log_prob(z, loc, scale):
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)


def bernoulli_log_prob(logits, x):
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


# ---------------------------------------------------------------------------------------------- hand-written
def hand_loss(module, x, objective: str, k: int) -> torch.Tensor:
    """The negative bound summed over the batch, written out in PyTorch (z = mu + sigma * eps)."""
    if isinstance(module, TwoLayerVAE):
        return _hand_two_layer(module, x, objective, k)
    if isinstance(module, TutorialVAE):
        loc, scale = module.encode(x)
        z = loc + scale * torch.randn((k,) + loc.shape)
        log_px = bernoulli_log_prob(module.dec(z), x)
        if objective == "analytic":
            kl = 0.5 * (loc ** 2 + scale ** 2 - 1).sum(-1) - scale.log().sum(-1)
            return -(log_px - kl).mean(0).sum()
        if objective == "dreg":
            log_q = normal_log_prob(z, loc.detach(), scale.detach())
        else:
            log_q = normal_log_prob(z, loc, scale)
        log_w = log_px + normal_log_prob(z, torch.zeros_like(z), torch.ones_like(z)) - log_q
        return _bound(log_w, z, objective)
    q = module.posterior(module.encoder(x))  # pyro_vae.VAE with a Cholesky or IAF family, Monte Carlo ELBO
    z = q.rsample((k,))
    log_px = bernoulli_log_prob(module.decoder(z.reshape(-1, module.z_dim)).reshape(k, x.shape[0], -1), x.flatten(1))
    log_w = log_px + normal_log_prob(z, torch.zeros_like(z), torch.ones_like(z)) - q.log_prob(z)
    return _bound(log_w, z, objective)


def _bound(log_w, z, objective):
    if objective == "elbo":
        return -log_w.mean(0).sum()
    if objective == "dreg":  # Tucker et al.: the guide's path gradient weighted by w~^2, the model's by w~
        w = torch.softmax(log_w.detach(), 0)
        if z.requires_grad:
            z.register_hook(lambda g: g * w.unsqueeze(-1))
        return -(w * log_w).sum()
    return -(torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])).sum()


def _hand_two_layer(m, x, objective, k):
    l1, s1 = m.gaussian(m.q1(x))
    z1 = l1 + s1 * torch.randn((k,) + l1.shape)
    l2, s2 = m.gaussian(m.q2(z1))
    z2 = l2 + s2 * torch.randn_like(l2)
    p1l, p1s = m.gaussian(m.p1(z2))
    log_w = (bernoulli_log_prob(m.px(z1), x) + normal_log_prob(z1, p1l, p1s)
             + normal_log_prob(z2, torch.zeros_like(z2), torch.ones_like(z2))
             - normal_log_prob(z1, l1, s1) - normal_log_prob(z2, l2, s2))
    return _bound(log_w, z1, objective)


# ---------------------------------------------------------------------------------------------- the columns
OURS = {"elbo": lambda k: MonteCarloELBO(num_particles=k), "analytic": lambda k: AnalyticKLELBO(num_particles=k),
        "dreg": lambda k: IWAEELBO(num_particles=k, estimator="dreg"), "iwae": lambda k: IWAEELBO(num_particles=k)}
PYRO = {"elbo": (Trace_ELBO, JitTrace_ELBO), "analytic": (TraceMeanField_ELBO, JitTraceMeanField_ELBO),
        "dreg": (RenyiELBO, None), "iwae": (RenyiELBO, None)}  # (Pyro has no JIT RenyiELBO)


def _pyro_objective(cls, objective, k, nesting):
    if cls is RenyiELBO:
        return cls(alpha=0.0, num_particles=k, max_plate_nesting=nesting)
    return cls(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=nesting)


def columns(make, objective: str, k: int, x, lr=1e-3) -> dict:
    """name -> step(): one training step of a fresh copy of the model (same initial weights) per column."""
    def fresh():
        torch.manual_seed(0)
        return make()

    def torch_step(module, loss_fn):
        opt = make_adam(list(module.parameters()), lr, x.device)

        def step():
            loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            (loss / x.shape[0]).backward()
            opt.step()
        return step

    out = {}
    m = fresh()
    out["hand"] = torch_step(m, lambda m=m: hand_loss(m, x, objective, k))
    for name, cls in zip(("svi", "jit"), PYRO[objective]):
        if cls is None:
            out[name] = _missing
            continue
        m = fresh()
        svi = SVI(m.model, m.guide, pyro.optim.PyroOptim(torch.optim.Adam, {"lr": lr, "fused": True}),
                  _pyro_objective(cls, objective, k, nesting=1))
        out[name] = own_param_store(lambda svi=svi: svi.step(x))
    m = fresh()
    obj = OURS[objective](k)
    out["traced"] = torch_step(m, lambda m=m, obj=obj: obj.surrogate_loss(lambda v: m.model(v), lambda v: m.guide(v), x))
    if isinstance(m, pyro_vae.VAE):
        m = fresh()
        out["twin"] = torch_step(m, lambda m=m, loss=ObjectiveModule(m, OURS[objective](k)): loss(x))
    m = fresh()
    module = ObjectiveModule(m, OURS[objective](k), compile=True)
    opt = make_adam(module.params, lr, x.device)

    def captured(module=module, opt=opt):
        loss, grads = module.loss_and_grads(x)
        for p, g in zip(module.params, grads):
            p.grad = g
        opt.step()
    out["captured"] = captured
    if k == 1:
        out["floor"] = floor_step(fresh(), x)
    out["_module"] = module
    return out


def floor_step(module, x):
    """A floor under any implementation of one K = 1 training step that keeps the model's kernels: each
    ``nn.Linear`` of ``module`` (masked ones too) once forward on ``len(x)`` rows and its two backward matrix
    products (the weight gradient, and the input gradient except for layers that read the data), then one fused
    Adam update of all parameters; nothing else (no activation, likelihood, sampling or reduction)."""
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    n = x.shape[0]
    inputs = {id(m): torch.rand(n, m.in_features, device=x.device) for m in linears}
    grads = {id(m): torch.rand(n, m.out_features, device=x.device) for m in linears}
    params = [q.detach().clone() for q in module.parameters()]
    for q in params:
        q.grad = torch.zeros_like(q)
    opt = make_adam(params, 1e-3, x.device)
    reads_data = {id(m) for m in linears if m.in_features == x[0].numel()}

    def step():
        with torch.no_grad():
            for m in linears:
                a, g = inputs[id(m)], grads[id(m)]
                torch.addmm(m.bias, a, m.weight.t()) if m.bias is not None else a @ m.weight.t()
                torch.mm(g.t(), a)
                if id(m) not in reads_data:
                    torch.mm(g, m.weight)
        opt.step()
    return step


def own_param_store(step):
    """``step`` run with a param store of its own: every column's model registers the same names, and SVI must
    capture (and update) only its own column's parameters. Swapping the store's three dicts costs ~1 us."""
    store, mine = pyro.get_param_store(), ({}, {}, {})
    fields = ("_params", "_param_to_name", "_constraints")

    def run():
        saved = tuple(getattr(store, f) for f in fields)
        for f, d in zip(fields, mine):
            setattr(store, f, d)
        try:
            return step()
        finally:
            for f, d in zip(fields, saved):
                setattr(store, f, d)
    return run


def _missing():
    raise NotImplementedError("Pyro has no JIT variant of RenyiELBO (IWAE)")


ROWS = [  # (label, model, objective, K, batch)
    ("user VAE, ELBO", "user", "elbo", 1, 20),
    ("user VAE, ELBO", "user", "elbo", 1, 128),
    ("user VAE, analytic KL", "user", "analytic", 1, 128),
    ("user VAE, IWAE-5 DReG", "user", "dreg", 5, 20),
    ("user VAE, IWAE-50", "user", "iwae", 50, 128),
    ("two-layer (Pyro program), ELBO", "twolayer", "elbo", 1, 128),
    ("pyro_vae.VAE cholesky, ELBO", "cholesky", "elbo", 1, 128),
    ("pyro_vae.VAE iaf, ELBO", "iaf", "elbo", 1, 128),
]
MODELS = {"user": TutorialVAE, "twolayer": TwoLayerVAE,
          "cholesky": lambda: pyro_vae.VAE((1, 28, 28), z_dim=20, hidden=(400,), guide="cholesky"),
          "iaf": lambda: pyro_vae.VAE((1, 28, 28), z_dim=20, hidden=(400,), guide="iaf")}


def time_row(row, threads: int, reps: int, steps: int, device) -> dict:
    label, model, objective, k, batch = row
    torch.set_num_threads(threads)
    x = torch.bernoulli(torch.full((batch, D), 0.13), generator=torch.Generator().manual_seed(0)).to(device)
    if model in ("cholesky", "iaf"):
        x = x.reshape(batch, 1, 28, 28)
    make = MODELS[model]
    with pyro.validation_enabled(False):
        cols = columns(lambda: make().to(device), objective, k, x)
        module = cols.pop("_module")
        result = {"row": label, "batch": batch, "K": k, "threads": threads, "ms": {}, "errors": {}}
        live = {}
        for name, step in cols.items():  # warm-up (the captured column captures and compiles here)
            try:
                for _ in range(5):  # (JitTrace_ELBO's executor optimizes after a few calls)
                    step()
                live[name] = step
            except Exception as e:  # noqa: BLE001 - e.g. JitTrace_ELBO's failures are a result to report
                result["errors"][name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
        result["capture_s"], result["compile_s"] = module.capture_seconds, module.compile_seconds
        result["captured"] = module.compiled
        times = {name: [] for name in live}
        for _ in range(reps):
            for name, step in live.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(steps):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t) / steps * 1e3)
    result["ms"] = {n: statistics.median(v) for n, v in times.items()}
    result["ratio_to_hand"] = {n: statistics.median(a / b for a, b in zip(v, times["hand"]))
                               for n, v in times.items()}
    return result


def warm_compile_seconds(device) -> dict:
    """Capture and compile seconds of a fresh capture of a graph Inductor has compiled before (warm cache)."""
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((128, D), 0.13)).to(device)
    module = ObjectiveModule(TutorialVAE().to(device), MonteCarloELBO(), compile=True)
    with pyro.validation_enabled(False):
        module.loss_and_grads(x)
    return {"capture_s": module.capture_seconds, "compile_s": module.compile_seconds}


@torch.no_grad()
def eval_throughput(device, points: int = 40, num_samples: int = 5000, chunk: int = 250) -> dict:
    """Points per second of the K = 5000 importance-sampled log p(x) of the user VAE: hand-written (the same
    chunks, a streamed logsumexp), pyro-vae on traces, and captured (its first, capturing pass excluded)."""
    from pyro_vae.evaluation import log_likelihood, streaming_logsumexp

    torch.manual_seed(0)
    m = TutorialVAE().to(device)
    x = torch.bernoulli(torch.full((points, D), 0.13), generator=torch.Generator().manual_seed(1)).to(device)

    def hand():
        def chunks():
            loc, scale = m.encode(x)
            for _ in range(num_samples // chunk):
                z = loc + scale * torch.randn((chunk,) + loc.shape)
                yield (bernoulli_log_prob(m.dec(z), x) + normal_log_prob(z, torch.zeros_like(z), torch.ones_like(z))
                       - normal_log_prob(z, loc, scale))
        return streaming_logsumexp(chunks()) - math.log(num_samples)

    def ours(compile):
        return log_likelihood(m.model, m.guide, x, num_samples=num_samples, chunk_size=chunk, batch_size=points,
                              progress=False, compile=compile)

    out = {}
    with pyro.validation_enabled(False):
        ours(True)  # capture and compile
        for name, fn in (("hand", hand), ("traced", lambda: ours(False)), ("captured", lambda: ours(True))):
            t = time.perf_counter()
            fn()
            out[name] = points / (time.perf_counter() - t)
    return out


def markdown(results: list, warm: dict) -> str:
    cols = ["hand", "svi", "jit", "traced", "twin", "captured", "floor"]
    lines = ["| row | batch | threads | " + " | ".join(cols) + " | captured / hand | svi / captured | "
             "jit / captured | capture s | compile s (cold) |", "|" + "---|" * (len(cols) + 8)]
    for r in results:
        ms = [f"{r['ms'][c]:.2f}" if c in r["ms"] else ("error" if c in r["errors"] else "") for c in cols]
        ratio = r["ratio_to_hand"]
        speedup = {c: (1 / ratio["captured"]) * ratio[c] if c in ratio and "captured" in ratio else None
                   for c in ("svi", "jit")}
        lines.append(f"| {r['row']} | {r['batch']} | {r['threads']} | " + " | ".join(ms) + " | "
                     f"{ratio.get('captured', float('nan')):.2f}x | "
                     + " | ".join(f"{speedup[c]:.2f}x" if speedup[c] else "-" for c in ("svi", "jit"))
                     + f" | {r['capture_s']:.1f} | {r['compile_s']:.1f} |")
    errors = {e for r in results for e in (f"{c}: {m}" for c, m in r["errors"].items())}
    notes = [f"- warm Inductor cache: capture {warm['capture_s']:.1f} s, compile {warm['compile_s']:.1f} s"]
    notes += [f"- {e}" for e in sorted(errors)]
    return "\n".join(lines + [""] + notes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rows", default="all", help="comma-separated row indices, or all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/capture.json")
    p.add_argument("--quick", action="store_true", help="one small row, 2 repetitions of 2 steps")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    if args.quick:
        rows, threads, args.reps, args.steps = [("user VAE, ELBO", "user", "elbo", 1, 8)], [1], 2, 2
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), torch {torch.__version__}, pyro {pyro.__version__}")
    results = []
    for row in rows:
        for t in threads:
            results.append(time_row(row, t, args.reps, args.steps, device))
            r = results[-1]
            print(r["row"], f"b{r['batch']}", f"{t} thr", {n: round(v, 2) for n, v in r["ms"].items()},
                  {n: round(v, 2) for n, v in r["ratio_to_hand"].items()}, r["errors"] or "", flush=True)
    warm = warm_compile_seconds(device)
    table = markdown(results, warm)
    print(table)
    evaluation = {} if args.quick else eval_throughput(device)
    if evaluation:
        print("log p(x), K=5000, points/s:", {k: round(v, 1) for k, v in evaluation.items()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "warm": warm, "evaluation": evaluation, "device": str(device),
                               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}, indent=1))
    return results


if __name__ == "__main__":
    main()
