"""``SpectralProjector.project_`` alone: the stacked path against the per-weight loop.

The gradients come from one real batch (CIFAR-10 for ResNet-18, bundled Fashion-MNIST for
SmallCNN); before every timed call they are restored, so both paths project the same gradient.
The two paths alternate every repeat. No refresh happens in the timed calls.

``python benchmarks/projection_only.py`` (CPU); ``--device cuda`` on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_info, image_batches, summary, timed, write_json  # noqa: E402

from dsbp import SpectralProjector  # noqa: E402
from dsbp.models.registry import build_model  # noqa: E402

CASES = {  # name -> (model, kwargs, dataset, channels, size, batch)
    "resnet18_w1": ("resnet18", {"width": 1.0}, "cifar10", 3, 32, 8),
    "resnet18_w0.25": ("resnet18", {"width": 0.25}, "cifar10", 3, 32, 16),
    "smallcnn": ("cnn", {}, "bundled", 1, 28, 64),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = {"env": env_info(device), "args": vars(args), "cases": {},
           "command": "python benchmarks/projection_only.py"}
    for case, (name, kw, ds, c, size, batch) in CASES.items():
        torch.manual_seed(0)
        m = build_model(name, c, 10, size, **kw).to(device)
        p = SpectralProjector(m, rank=10, interval=10**9)
        x, y = image_batches(ds, batch, 1, device)[0]
        F.cross_entropy(m(x), y).backward()
        p.project_()  # the one refresh
        F.cross_entropy(m(x), y).backward()
        g0 = {n: q.grad.clone() for n, q in m.named_parameters()}
        res = {True: [], False: []}
        for r in range(args.repeats):
            for fast in ((True, False) if r % 2 else (False, True)):
                p.path = "stacked" if fast else "loop"
                for n, q in m.named_parameters():
                    q.grad.copy_(g0[n])
                res[fast].append(timed(p.project_, device))
        f, ref = statistics.median(res[True]), statistics.median(res[False])
        out["cases"][case] = {"fast_s": summary(res[True]), "loop_s": summary(res[False]),
                              "loop_over_fast": ref / f}
        print(f"{case}: fast {1e3 * f:.2f} ms, loop {1e3 * ref:.2f} ms, loop/fast {ref / f:.2f}")
    write_json(f"projection_only_{device.type}.json", out)
    return out


if __name__ == "__main__":
    main()
