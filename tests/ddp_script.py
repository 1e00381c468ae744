"""Run by tests/test_distributed.py, alone or under torchrun: trains a VAE with a point-mass guide (a
deterministic objective, so one process with batch 2B and two processes with batch B must agree exactly)."""
import os
import signal
import sys

import torch

import pyro
import pyro.distributions as dist

from pyro_vae import VAE, fit, load_dataset
from pyro_vae.distributed import teardown
from pyro_vae.guides import PosteriorFamily


class PointMass(PosteriorFamily):
    """q(z|x) = delta(z - mu(x)): no sampling noise."""

    def __init__(self, z_dim):
        super().__init__(z_dim)
        self.num_params = self.z_dim

    def forward(self, params):
        return dist.Delta(params, event_dim=1)


class KillRankOne(pyro.infer.Trace_ELBO):
    def differentiable_loss(self, *args, **kwargs):
        if os.environ.get("RANK") == "1" and torch.is_grad_enabled():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().differentiable_loss(*args, **kwargs)


def main(out, batch_size, mode):
    torch.manual_seed(0)
    data = load_dataset("digits")
    vae = VAE(input_shape=data.input_shape, z_dim=3, hidden=(32,), guide=PointMass(3))
    objective = KillRankOne() if mode == "kill" else pyro.infer.Trace_ELBO()
    compile = {"graph": "graph", "compile": True}.get(mode, False)  # the captured step averages its own gradients
    hist = fit(vae, data.x_train[:256], objective=objective, epochs=2, batch_size=batch_size, lr=1e-2,
               progress=False, device="cpu", compile=compile)
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save({"model": vae.state_dict(), "train_loss": hist[-1]["train_loss"]}, out)
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "train")
