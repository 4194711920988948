"""Host time of drawing the activation rows of one refresh: a permutation of all n rows
(``randperm(n)[:m]``, O(n)) against the sampler of ``dsbp.layers.adapters._pick`` (a uniform
m-subset without a permutation: draws with replacement, the distinct values, a uniform subset of
them; O(m log m)), interleaved in one run.

n are the candidate rows of ResNet-18's four stages at batch 512 (batch x positions: 32x32,
16x16, 8x8, 4x4 maps), m = 8192 (``max_rows``). One torch thread.

``python benchmarks/row_sampler.py``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_info, summary, write_json  # noqa: E402

from dsbp.layers.adapters import _pick  # noqa: E402


def permutation(n: int, m: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=g)[:m].sort().values


def main() -> dict:
    torch.set_num_threads(1)
    m, repeats = 8192, 30
    g = torch.Generator().manual_seed(0)
    res: dict = {"env": env_info(torch.device("cpu")), "m": m, "repeats": repeats, "cases": {},
                 "command": "python benchmarks/row_sampler.py"}
    for n in (512 * 32 * 32, 512 * 16 * 16, 512 * 8 * 8):
        t: dict[str, list[float]] = {"permutation": [], "subset": []}
        for r in range(repeats):
            arms = (("permutation", permutation), ("subset", _pick))
            for name, fn in arms[:: 1 - 2 * (r % 2)]:  # alternate which goes first
                t0 = time.perf_counter()
                fn(n, m, g)
                t[name].append(time.perf_counter() - t0)
        case = {k: summary(v) for k, v in t.items()}
        case["speedup"] = case["permutation"]["median"] / case["subset"]["median"]
        res["cases"][str(n)] = case
        print(f"n={n}: permutation {1e3 * case['permutation']['median']:.2f} ms, subset "
              f"{1e3 * case['subset']['median']:.3f} ms ({case['speedup']:.0f}x)")
    write_json("row_sampler_cpu.json", res)
    return res


if __name__ == "__main__":
    main()
