"""Issue 7: which rank does the energy rule pick? At initialisation, SmallCNN on a Fashion-MNIST
batch: per layer, the top eigenvalue's share of trace(C) (C = A^T A, uncentred, METHOD.md §1)
and the rank ``k_active`` that ``energy`` = 0.9 / 0.99 selects under a cap of 64.

Usage::

    python scripts/dsbp_claims_energy_rank.py > results/dsbp_claims_cpu/energy_rank.txt
"""

from __future__ import annotations

import torch

from dsbp import SpectralProjector
from dsbp.data import load_dataset
from dsbp.data.subset import balanced_subset
from dsbp.models.cnn import SmallCNN


def main() -> None:
    torch.set_num_threads(1)
    ds = load_dataset("fashion_mnist")
    x, y = balanced_subset(ds.x_train, ds.y_train, 128, seed=0)
    mean, std = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)
    xf = (x.float() / 255 - mean) / std
    torch.manual_seed(0)
    net = SmallCNN()
    print("energy layer d k_active lam1/trace")
    for energy in (0.9, 0.99):
        p = SpectralProjector(net, rank=64, interval=1, energy=energy)
        torch.nn.functional.cross_entropy(net(xf), y).backward()
        p.project_()
        for n in p.layer_names():
            st = p.layer_state(n)
            print(energy, n, st.block.shape[0], st.k_active,
                  f"{float(st.eigenvalues[0] / st.trace):.3f}")
        p.remove()
        net.zero_grad()


if __name__ == "__main__":
    main()
