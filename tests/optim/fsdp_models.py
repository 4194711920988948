"""Model, data and loop shared by the FSDP2 tests (2 gloo ranks against one process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dsbp.optim.comm import is_dtensor

BUNDLED = Path(__file__).resolve().parents[2] / "src/dsbp/data/bundled/fashion_mnist_small.npz"
STEPS, LOCAL, WORLD = 5, 16, 2


class Net(nn.Module):
    """Conv + Linear layers without BatchNorm; fc1's 25 rows shard unevenly over 2 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(96, 25)
        self.fc2 = nn.Linear(25, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    d = np.load(BUNDLED)
    x = torch.from_numpy(d["x_train"][::31][: STEPS * LOCAL * WORLD]).permute(0, 3, 1, 2)
    y = torch.from_numpy(d["y_train"][::31][: STEPS * LOCAL * WORLD])
    return (x.float() / 255.0 - 0.286) / 0.353, y


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
           rank: int, world: int, steps: range = range(STEPS)) -> None:
    for t in steps:
        g = slice(t * LOCAL * WORLD, (t + 1) * LOCAL * WORLD)  # the global batch of step t
        xb, yb = x[g], y[g]
        if world > 1:
            xb, yb = xb[rank * LOCAL:(rank + 1) * LOCAL], yb[rank * LOCAL:(rank + 1) * LOCAL]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def local_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer moments this rank holds (DTensors: the local shard; step counters
    and the projector's bases left out)."""
    inner = getattr(opt, "base_optimizer", opt)
    total = 0
    for s in inner.state.values():
        for k, v in s.items():
            if isinstance(v, torch.Tensor) and k != "step":
                t = v.to_local() if is_dtensor(v) else v
                total += t.numel() * t.element_size()
    return total


def shard(net: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for m in (net.conv, net.fc1, net.fc2):
        fully_shard(m)
    fully_shard(net)
