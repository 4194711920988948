"""Shared helpers of the extension runner scripts (ext_architecture.py, ext_inference.py).

A small SmallCNN trainer on a class-balanced subset, accuracy, and the provenance block every
committed result carries (command, commit, seed, device).
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time

import torch
from torch import nn

from dsbp.data import load_dataset
from dsbp.data.loader import DeviceLoader
from dsbp.data.subset import balanced_subset
from dsbp.models.cnn import SmallCNN


def load_subset(name: str, n_train: int, n_test: int, seed: int, root: str | None = None):
    """``(ds, x_tr, y_tr, x_te, y_te)``: balanced subsets (train seeded by ``seed``, test by 0)."""
    ds = load_dataset(name, root=root)
    x_tr, y_tr = balanced_subset(ds.x_train, ds.y_train, n_train, seed=seed)
    x_te, y_te = balanced_subset(ds.x_test, ds.y_test, n_test, seed=0)
    return ds, x_tr, y_tr, x_te, y_te


def loader(x, y, ds, batch_size=128, shuffle=False, seed=0) -> DeviceLoader:
    return DeviceLoader(x, y, batch_size, shuffle=shuffle, augment=False, seed=seed,
                        mean=ds.mean, std=ds.std)


def train_cnn(ds, x_tr, y_tr, epochs: int, seed: int, lr: float = 0.05, width: int = 32,
              batch_size: int = 128) -> nn.Module:
    """SGD (momentum 0.9, wd 5e-4, cosine) training of ``SmallCNN`` on the given split."""
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=int(x_tr.shape[1]), num_classes=len(ds.classes), width=width)
    train = loader(x_tr, y_tr, ds, batch_size, shuffle=True, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    total = epochs * len(train)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total,
                                                pct_start=0.15)
    model.train()
    for e in range(epochs):
        for x, y in train.iter_epoch(e):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, test: DeviceLoader) -> float:
    model.eval()
    correct = n = 0
    for x, y in test.iter_epoch(0):
        correct += int((model(x).argmax(1) == y).sum())
        n += len(y)
    return correct / n


def provenance(seed: int, t0: float) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    mine = ["src/dsbp/core/lie.py", "src/dsbp/extensions/inference.py",
            "src/dsbp/extensions/architecture.py", "src/dsbp/extensions/lie_dynamics.py",
            "scripts/_ext_common.py", "scripts/ext_architecture.py", "scripts/ext_inference.py"]
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *mine],
                           capture_output=True, text=True).stdout.strip()
    return {
        "command": "python " + " ".join(sys.argv),
        "commit": commit + (" (+uncommitted changes)" if dirty else ""),
        "seed": seed,
        "device": f"CPU ({torch.get_num_threads()} threads, shared 2-core machine), subset",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "wall_seconds": round(time.time() - t0, 1),
    }
