"""DSBP's communication under DDP and FSDP2, measured, and a projection for a 1B transformer.

Measured: a small ViT (``dsbp.models.vit``) on real Tiny ImageNet batches, 2 gloo CPU ranks,
``DistributedDSBP`` around SGD. Every collective DSBP issues goes through its
:class:`~dsbp.optim.distributed.ProcessGroupCommunicator`, which counts calls and payload bytes;
the counters are read after each step. Steps 0 and 2 refresh (0: cold start, 2: warm), steps 1
and 3 only project. Layouts: DDP, FSDP2 (``fully_shard`` per block and at the root); sides:
output and input. For FSDP2 the *all-gather alternative* (assemble each full gradient and
weight, project, keep the own rows: what Distributed Shampoo does for FSDP2) runs next to the
real step on the same gradients, counting its all-gather payloads; its result is checked
against DSBP's row-sharded projection (largest difference recorded).

Then the implementation's own formulas (:func:`refresh_bytes`, :func:`step_bytes`) are checked
against every measured step (exact equality is recorded), and applied to a 1B-parameter
transformer (hidden 2048, 24 blocks of qkv / proj / fc1 / fc2, k = 128, 8 ranks): an
**estimate**, labelled so in the JSON.

Payload bytes are the tensors handed to the collective on one rank. What a backend puts on the
wire differs: a ring all-reduce sends and receives ``2 (W - 1) / W`` times the payload per rank,
an all-gather receives ``(W - 1) / W`` of its (full) output, a broadcast about the payload.

    nice -n 10 .venv/bin/python benchmarks/communication.py      # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_info, write_json  # noqa: E402

import dsbp  # noqa: E402
from dsbp.models.vit import ViT  # noqa: E402
from dsbp.optim.comm import is_dtensor  # noqa: E402
from dsbp.optim.distributed import DistributedDSBP, launch  # noqa: E402

F32, F64 = 4, 8
SETTINGS = dict(rank=8, interval=2, power_iters=5, sharpness=0.1, max_rows=4096)
PROJ_KW = {"oversample": 8, "exact_threshold": 0, "cold_iters": 10}
VIT = dict(image_size=64, patch=8, num_classes=200, dim=64, depth=2, heads=4)
STEPS, LOCAL, WORLD = 4, 16, 2


# ---------------------------------------------------------------------------- the formulas
def block_width(d: int, k: int, oversample: int) -> int:
    return min(d, min(k, d) + oversample)


def refresh_bytes(d: int, k: int, oversample: int, iters: int) -> dict[str, int]:
    """Payload bytes of one layer's refresh (per-layer path) as the projector issues them:
    health counts (4 float64) and the trace (1 float32) all-reduced, ``iters`` block products
    plus the Rayleigh-Ritz product ``A^T (A V)`` (d, b) all-reduced, the block and the
    eigenvalues broadcast. ``iters`` = power_iters warm, cold_iters on a power-iteration cold
    start (exact_threshold below d)."""
    b = block_width(d, k, oversample)
    return {"all_reduce_sum": 4 * F64 + F32 + (iters + 1) * d * b * F32,
            "broadcast_": (d * b + b) * F32}


def step_bytes(d_out: int, d_in: int, k: int, side: str, sharpness: bool, sharded: bool
               ) -> int:
    """Payload of one layer's projection per step: under FSDP2 on the output side the thin
    factor ``E^T G`` (k, d_in), with ``e1^T W`` (1, d_in) riding along when the sharpness term
    is on, summed over the row shards; nothing on the input side or under DDP."""
    if not sharded or side == "input":
        return 0
    return (min(k, d_out) + (1 if sharpness else 0)) * d_in * F32


def all_gather_bytes(d_out: int, d_in: int, sharpness: bool) -> int:
    """The all-gather alternative's payload per layer and step: the full gradient (and the
    full weight for the sharpness term), d_out x d_in each."""
    return d_out * d_in * F32 * (2 if sharpness else 1)


# ---------------------------------------------------------------------------- measurement
def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    from dsbp.data.registry import load_dataset

    ds = load_dataset("tiny_imagenet")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(ds.x_train.shape[0], generator=g)[: STEPS * LOCAL * WORLD]
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    x = (ds.x_train[idx].float() / 255.0 - mean) / std
    y = ds.y_train[idx]
    n = LOCAL * WORLD
    return [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(STEPS)]


def _gather_rows(t: torch.Tensor, n_rows: int, counter: list[int]) -> torch.Tensor:
    """The full (n_rows, ...) tensor from every rank's row shard (FSDP2 pads the first ranks'
    ceil(n / W) rows): an all-gather of equal padded chunks."""
    local = t.to_local()
    w = dist.get_world_size()
    chunk = -(-n_rows // w)
    pad = torch.zeros((chunk, *local.shape[1:]), dtype=local.dtype)
    pad[: local.shape[0]] = local
    out = torch.empty((chunk * w, *local.shape[1:]), dtype=local.dtype)
    dist.all_gather_into_tensor(out, pad)
    counter[0] += out.numel() * out.element_size()
    return out[:n_rows]


def _all_gather_alternative(opt: DistributedDSBP, counter: list[int]) -> dict[str, torch.Tensor]:
    """Each weight's DSBP direction by gathering the full gradient (and weight), projecting it
    on every rank, keeping the own rows: the alternative to the row-sharded reduction."""
    from dsbp.core.projection import dsbp_update_

    proj, comm = opt.projector, opt.comm
    out = {}
    for name in proj.layer_names():
        st = proj.layer_state(name)
        if st.block is None or st.param.grad is None:
            continue
        p = st.param
        G = st.matrix(_gather_rows(p.grad, p.shape[0], counter)).clone()
        W = st.matrix(_gather_rows(p.detach(), p.shape[0], counter)) if st.sharpness else None
        dsbp_update_(G, st.basis, st.side, W=W, scale=st.sharpness_scale())
        out[name] = G[comm.row_slice(p)]
    return out


def _rank(rank: int, world: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    batches = _batches()
    result: dict = {}
    for layout in ("ddp", "fsdp2"):
        for side in ("output", "input"):
            torch.manual_seed(0)
            net = ViT(**VIT)
            if layout == "fsdp2":
                for blk in net.blocks:
                    fully_shard(blk)
                fully_shard(net)
                model = net
            else:
                model = DDP(net)
            opt = DistributedDSBP(net, torch.optim.SGD, side=side, lr=0.05, momentum=0.9,
                                  projector_kwargs=PROJ_KW, **SETTINGS)
            steps = []
            for t, (x, y) in enumerate(batches):
                xb, yb = x[rank * LOCAL:(rank + 1) * LOCAL], y[rank * LOCAL:(rank + 1) * LOCAL]
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.comm.stats.reset()
                gathered, alt = [0], None
                if layout == "fsdp2" and t % SETTINGS["interval"] != 0:  # bases exist
                    alt = _all_gather_alternative(opt, gathered)
                opt.step()
                rec = {"step": t, "refresh": t % SETTINGS["interval"] == 0,
                       **opt.comm.stats.as_dict()}
                if alt is not None:
                    diff = max(float((opt.comm.local(opt.projector.layer_state(n).param.grad)
                                      .reshape(a.shape) - a).abs().max()) if a.numel() else 0.0
                               for n, a in alt.items())
                    rec["all_gather_alternative"] = {"bytes": gathered[0],
                                                     "max_abs_diff_to_row_sharded": diff}
                steps.append(rec)
            layers = []
            for n in opt.projector.layer_names():
                st = opt.projector.layer_state(n)
                layers.append({"name": n, "d_out": st.shape[0], "d_in": st.shape[1],
                               "dim": st.dim, "sharded": is_dtensor(st.param)})
            result[f"{layout}/{side}"] = {"steps": steps, "layers": layers,
                                         "param_bytes": sum(p.numel() * p.element_size()
                                                            for p in net.parameters())}
    if rank == 0:
        torch.save(result, Path(out_dir) / "comm.pt")


def _predicted(layers: list[dict], side: str, sharded: bool, refresh: str) -> dict[str, int]:
    k, ov = SETTINGS["rank"], PROJ_KW["oversample"]
    iters = {"cold": PROJ_KW["cold_iters"], "warm": SETTINGS["power_iters"], "none": 0}[refresh]
    pred = {"all_reduce_sum": 0, "broadcast_": 0, "sum_over_row_shards": 0}
    for L in layers:
        if refresh != "none":
            for kind, v in refresh_bytes(L["dim"], k, ov, iters).items():
                pred[kind] += v
        pred["sum_over_row_shards"] += step_bytes(L["d_out"], L["d_in"], k, side,
                                                  SETTINGS["sharpness"] > 0, sharded)
    return pred


# ---------------------------------------------------------------------------- 1B estimate
def transformer_estimate(hidden: int = 2048, blocks: int = 24, k: int = 128, ranks: int = 8,
                         oversample: int = 8, power_iters: int = 5, interval: int = 100,
                         sharpness: bool = True) -> dict:
    """Bytes per step and per refresh for a GPT-style transformer, from the formulas above
    (fp32 everywhere; embeddings and norms left out). An estimate, not a measurement."""
    h = hidden
    shapes = [(3 * h, h), (h, h), (4 * h, h), (h, 4 * h)]  # qkv, proj, fc1, fc2 per block
    params = blocks * sum(a * b for a, b in shapes)
    w = ranks
    out: dict = {"label": "ESTIMATE from the implementation's formulas (not measured)",
                 "model": {"hidden": h, "blocks": blocks, "k": k, "ranks": ranks,
                           "oversample": oversample, "power_iters": power_iters,
                           "interval": interval, "sharpness": sharpness,
                           "projected_params": params, "dtype": "fp32"},
                 "sides": {}}
    for side in ("output", "input"):
        ref = {"all_reduce_sum": 0, "broadcast_": 0}
        step_fsdp = 0
        gather = 0
        for d_out, d_in in shapes:
            d = d_out if side == "output" else d_in
            for kind, v in refresh_bytes(d, k, oversample, power_iters).items():
                ref[kind] += blocks * v
            step_fsdp += blocks * step_bytes(d_out, d_in, k, side, sharpness, True)
            gather += blocks * all_gather_bytes(d_out, d_in, sharpness)
        refresh_payload = ref["all_reduce_sum"] + ref["broadcast_"]
        out["sides"][side] = {
            "refresh_payload_bytes": refresh_payload,
            "refresh_wire_bytes_per_rank_ring": int(2 * (w - 1) / w * ref["all_reduce_sum"]
                                                    + ref["broadcast_"]),
            "refresh_amortised_per_step_payload_bytes": refresh_payload / interval,
            "fsdp2_step_payload_bytes": step_fsdp,
            "fsdp2_step_wire_bytes_per_rank_ring": int(2 * (w - 1) / w * step_fsdp),
            "ddp_step_payload_bytes": 0,
            "all_gather_alternative_step_payload_bytes": gather,
            "all_gather_alternative_step_received_per_rank": int((w - 1) / w * gather),
        }
    pb = params * F32
    out["training_traffic_per_step"] = {
        "ddp_gradient_all_reduce_wire_per_rank_ring": int(2 * (w - 1) / w * pb),
        "fsdp2_param_all_gather_fwd_bwd_plus_grad_reduce_scatter_received_per_rank":
            int(3 * (w - 1) / w * pb),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="communication_cpu.json",
                    help="file name under benchmarks/results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        launch(_rank, WORLD, args=(tmp,), backend="gloo")
        res = torch.load(Path(tmp) / "comm.pt", weights_only=True)
    measured = {}
    formula_ok = True
    for key, r in res.items():
        layout, side = key.split("/")
        sharded = layout == "fsdp2"
        rows = []
        for s in r["steps"]:
            kind = ("cold" if s["step"] == 0 else "warm") if s["refresh"] else "none"
            pred = _predicted(r["layers"], side, sharded, kind)
            match = pred == s["bytes"]
            formula_ok &= match
            rows.append({**s, "refresh_kind": kind, "formula_bytes": pred,
                         "formula_matches": match})
        measured[key] = {"layers": r["layers"], "param_bytes": r["param_bytes"], "steps": rows}
    env = env_info(torch.device("cpu"))
    src = Path(dsbp.__file__).resolve().parent
    stamp = src.parent.parent / "COMMIT"  # a clean export run through PYTHONPATH
    if stamp.exists():
        env.update(commit=stamp.read_text().strip(), dirty=False,
                   source=f"clean git archive of the commit at {src}")
    payload = {
        "command": "nice -n 10 .venv/bin/python benchmarks/communication.py",
        "env": env,
        "world_size": WORLD, "backend": "gloo", "model": {"vit": VIT}, "data": "tiny_imagenet",
        "global_batch": LOCAL * WORLD, "settings": {**SETTINGS, **PROJ_KW},
        "seeds": {"model": 0, "batches": 0},
        "measured": measured,
        "formulas_match_every_measured_step": formula_ok,
        "estimate_1b": transformer_estimate(),
    }
    payload["tables"] = render(payload)
    path = write_json(args.out, payload)
    print(payload["tables"]["markdown"])
    print("formulas match:", formula_ok, "->", path)


def render(payload: dict) -> dict:
    """The Markdown tables docs/distributed.md shows, with every derived value stored."""
    kb = 1e3
    rows, md = [], ["| layout | side | cold refresh (kB) | warm refresh (kB) | projection step (kB)"
                    " | all-gather alternative step (kB) | alternative / DSBP per step |",
                    "|---|---|---|---|---|---|---|"]
    for key, m in payload["measured"].items():
        layout, side = key.split("/")
        by = {s["refresh_kind"]: s for s in m["steps"]}
        cold = sum(by["cold"]["bytes"].values()) - by["cold"]["bytes"]["sum_over_row_shards"]
        warm = sum(by["warm"]["bytes"].values()) - by["warm"]["bytes"]["sum_over_row_shards"]
        step = by["none"]["bytes"]["sum_over_row_shards"]
        alt = by["none"].get("all_gather_alternative", {}).get("bytes")
        row = {"layout": layout, "side": side, "cold_refresh_kB": round(cold / kb, 1),
               "warm_refresh_kB": round(warm / kb, 1), "step_kB": round(step / kb, 1),
               "all_gather_step_kB": None if alt is None else round(alt / kb, 1),
               "all_gather_over_dsbp": None if not (alt and step) else round(alt / step, 1)}
        rows.append(row)
        md.append(f"| {layout} | {side} | {row['cold_refresh_kB']} | {row['warm_refresh_kB']} | "
                  f"{row['step_kB']} | {row['all_gather_step_kB'] or '-'} | "
                  f"{row['all_gather_over_dsbp'] or '-'} |")
    est = payload["estimate_1b"]
    tr = est["training_traffic_per_step"]
    fsdp_own = tr["fsdp2_param_all_gather_fwd_bwd_plus_grad_reduce_scatter_received_per_rank"]
    mb = 1e6
    erows = []
    md += ["", "| side | refresh payload (MB) | refresh per step at p=100 (MB) | FSDP2 projection"
           " per step, ring wire per rank (MB) | % of FSDP2's own traffic | all-gather "
           "alternative received per rank per step (MB) |", "|---|---|---|---|---|---|"]
    for side, e in est["sides"].items():
        r = {"side": side, "refresh_MB": round(e["refresh_payload_bytes"] / mb, 1),
             "refresh_per_step_MB": round(e["refresh_amortised_per_step_payload_bytes"] / mb, 1),
             "fsdp2_step_wire_MB": round(e["fsdp2_step_wire_bytes_per_rank_ring"] / mb, 1),
             "fsdp2_step_pct_of_fsdp2_traffic": round(
                 100 * e["fsdp2_step_wire_bytes_per_rank_ring"] / fsdp_own, 2),
             "all_gather_step_MB": round(e["all_gather_alternative_step_received_per_rank"]
                                         / mb, 1)}
        erows.append(r)
        md.append(f"| {side} | {r['refresh_MB']} | {r['refresh_per_step_MB']} | "
                  f"{r['fsdp2_step_wire_MB']} | {r['fsdp2_step_pct_of_fsdp2_traffic']}% | "
                  f"{r['all_gather_step_MB']} |")
    own = {"fsdp2_own_traffic_per_step_MB": round(fsdp_own / mb, 1),
           "ddp_own_traffic_per_step_MB": round(
               tr["ddp_gradient_all_reduce_wire_per_rank_ring"] / mb, 1)}
    return {"measured": rows, "estimate": erows, "training_traffic": own,
            "markdown": "\n".join(md)}


if __name__ == "__main__":
    main()
