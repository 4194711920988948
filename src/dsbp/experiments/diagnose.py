"""Diagnostics of a run's final checkpoint, written into the run (``dsbp diagnose RUN_DIR``;
command line: ``dsbp.cli.diagnose``).

Only a finished run is diagnosed unless ``allow_unfinished`` (``--unfinished``) is given: the
checkpoint of an unfinished run is a mid-training state, and ``diagnostics.json`` then says so
(``run_status``, ``checkpoint_epoch``, ``checkpoint_step``).

Loads ``config.json`` and ``checkpoint.pt``, rebuilds the model, and computes on the first
``--batches`` training batches (no augmentation, fixed order):

- the top ``--hessian-k`` Hessian eigenvalues (Lanczos) and the Hutchinson trace;
- per-layer top Hessian eigenvalue of each weight block;
- per-layer spectrum of the output-activation covariance (top ``--rank`` eigenvalues over the
  trace, and their variance: figure 3b) [ours: the paper's "eigenvalue variance by layer"];
- 1-D loss slices along a filter-normalised random direction and the top Hessian eigenvector,
  and a 2-D filter-normalised slice (figure 3a);
- the perturbation curve (figure 4);
- the "tensor stratification" points of figure 2: one layer's output activations in the 3
  leading principal coordinates, before and after projection onto the top-``--rank``
  eigenvectors of their covariance (the DSBP basis of that layer when the run has one);
- optionally (``--pac-bayes``) the PAC-Bayes bound against the seeded initial weights.

Writes ``RUN_DIR/diagnostics/diagnostics.json`` and PNGs of the slices and the curve there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["diagnose_run"]


def _activation_spectra(model: nn.Module, x: torch.Tensor, rank: int, projector: Any
                        ) -> tuple[list[dict], dict | None]:
    """Per-layer normalised top eigenvalues of the output-activation covariance, and the
    stratification points of the first layer with >= 3 output channels."""
    from dsbp.core.eigen import top_eigh
    from dsbp.layers import adapters

    captured: dict[str, torch.Tensor] = {}
    handles = []
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for name, mod in layers:
        def hook(m, inp, out, name=name):
            gen = torch.Generator().manual_seed(0)
            captured[name] = adapters.rows(m, inp[0], out, "output", 4096, gen).detach()
        handles.append(mod.register_forward_hook(hook))
    try:
        from dsbp.diagnostics.hvp import eval_mode

        with torch.no_grad(), eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    spectra, strat = [], None
    for idx, (name, _) in enumerate(layers):
        A = captured[name].double().cpu()  # (n, d) rows
        C = A.T @ A
        tr = torch.trace(C).item()
        k = min(rank, C.shape[0])
        vals, vecs = top_eigh(C, k)
        lam = (vals / tr).tolist() if tr > 0 else [0.0] * k
        mean = sum(lam) / k
        spectra.append({"layer": name, "index": idx, "d": int(C.shape[0]),
                        "eigenvalues_over_trace": lam,
                        "variance": sum((v - mean) ** 2 for v in lam) / k})
        if strat is None and C.shape[0] >= 3 and A.shape[0] >= 3:
            E = vecs
            source = "activation covariance"
            if projector is not None and name in projector.layer_names():
                st = projector.layer_state(name)
                if st.block is not None and st.side == "output":
                    E, source = projector.basis(name).double().cpu(), "DSBP basis"
            after = A @ E @ E.T
            # Common 3-D coordinates: the top-3 principal directions of the raw rows.
            _, V3 = top_eigh(C, 3)
            n_pts = min(A.shape[0], 1000)
            strat = {"layer": name, "basis": source, "rank": int(E.shape[1]),
                     "before": (A[:n_pts] @ V3).tolist(), "after": (after[:n_pts] @ V3).tolist()}
    return spectra, strat


def diagnose_run(
    run_dir: str | Path,
    *,
    batches: int = 2,
    hessian_k: int = 3,
    trace_samples: int = 20,
    rank: int = 10,
    slice_points: int = 21,
    slice_2d_points: int = 9,
    perturb_draws: int = 5,
    pac_bayes: bool = False,
    pac_samples: int = 2000,
    pac_mc: int = 20,
    device: str = "cpu",
    png: bool = True,
    allow_unfinished: bool = False,
) -> Path:
    """Compute the diagnostics of one run's final checkpoint; returns the JSON path.

    Raises:
        ValueError: no checkpoint, or the run has not finished (no ``result.json``) and
            ``allow_unfinished`` is False.
        CorruptFileError: an unreadable ``config.json``, ``result.json`` or checkpoint.
    """
    from dsbp import diagnostics as dg
    from dsbp.diagnostics.landscape import hessian_directions
    from dsbp.experiments.build import (
        BuildContext,
        build_loss,
        build_method,
        build_model_for,
        load_data,
        resolve_device,
    )
    from dsbp.experiments.run import check_data_root, load_checkpoint, load_config, read_result

    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    if not ckpt_path.exists():
        raise ValueError(f"{run_dir}: no checkpoint.pt (has the run started?)")
    t0 = time.time()
    cfg = load_config(run_dir)
    res = read_result(run_dir)
    ckpt = load_checkpoint(ckpt_path, "cpu")
    where = (f"epoch {ckpt['state'].get('epoch')}, batch {ckpt['state'].get('batch')}, "
             f"step {ckpt['state'].get('step')} of {cfg.epochs} epoch(s)")
    if res is None and not allow_unfinished:
        raise ValueError(f"{run_dir} has not finished (no result.json): its checkpoint is a "
                         f"mid-training state ({where}). Finish it with `dsbp bench --resume`, "
                         "or pass --unfinished to diagnose that state anyway")
    dev = resolve_device(device)
    check_data_root(cfg)
    # Un-augmented training batches in a fixed order: the loss being diagnosed.
    data = load_data(dataclasses.replace(cfg, augment=False), dev)
    model = build_model_for(cfg, data).to(dev)
    init = build_model_for(cfg, data).to(dev)  # the seeded initial weights (PAC-Bayes prior)
    loss_fn = build_loss(cfg)
    ckpt = load_checkpoint(ckpt_path, dev)
    model.load_state_dict(ckpt["model"])
    projector = None
    try:  # the run's DSBP bases, for figure 2; methods without a projector skip this
        method = build_method(model, cfg, BuildContext(loss_fn=loss_fn, train=data.train,
                                                       device=dev,
                                                       num_classes=data.num_classes))
        method.load_state_dict(ckpt["method"])
        projector = getattr(method.optimizer, "projector", None)
        # Hooks off: diagnostics only read the restored bases (they capture nothing in eval
        # mode anyway).
        method.close()
    except Exception as err:  # noqa: BLE001 - a method we cannot rebuild only loses figure 2's basis
        print(f"note: method state not restored ({err}); figure 2 uses activation eigenvectors")
    batch_list = []
    for i, b in enumerate(data.train.iter_epoch(0)):
        if i >= batches:
            break
        batch_list.append((b[0], b[1]))
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"run_dir": str(run_dir), "method": cfg.method, "dataset": cfg.dataset,
                           "model": cfg.model, "seed": cfg.seed,
                           "run_status": res.status if res is not None else "unfinished",
                           "checkpoint_epoch": ckpt["state"].get("epoch"),
                           "checkpoint_step": ckpt["state"].get("step"),
                           "batches": batches,
                           "examples": sum(int(y.shape[0]) for _, y in batch_list)}
    eig = dg.hessian_top_eigenvalues(model, loss_fn, batch_list, k=hessian_k, generator=gen)
    assert not isinstance(eig, dict)  # per_layer=False: one estimate
    out["hessian_top_eigenvalues"] = eig.eigenvalues.tolist()
    tr = dg.hessian_trace(model, loss_fn, batch_list, trace_samples, generator=gen)
    assert not isinstance(tr, dict)
    out["hessian_trace"] = {"mean": tr.mean, "stderr": tr.stderr, "n_samples": tr.n_samples}
    per_layer = dg.hessian_top_eigenvalues(model, loss_fn, batch_list, k=1, per_layer=True,
                                           iters=20, generator=gen)
    assert isinstance(per_layer, dict)  # per_layer=True: one estimate per layer
    out["hessian_top_per_layer"] = [{"layer": n, "index": i, "top": float(e.eigenvalues[0])}
                                    for i, (n, e) in enumerate(per_layer.items())]
    spectra, strat = _activation_spectra(model, batch_list[0][0], rank, projector)
    out["activation_spectra"] = spectra
    out["stratification"] = strat
    alphas = torch.linspace(-1.0, 1.0, slice_points)
    d_rand = dg.filter_normalized_direction(model, generator=gen)
    w_norm = dg.flat_params(model).double().norm().item()
    (d_hess,) = hessian_directions(eig.eigenvectors[:, :1], scale=w_norm / 10)
    out["slice_1d"] = {
        "alphas": alphas.tolist(),
        "random_filter_normalised": dg.loss_slice_1d(model, loss_fn, batch_list, d_rand,
                                                     alphas).tolist(),
        "top_hessian_eigenvector": dg.loss_slice_1d(model, loss_fn, batch_list, d_hess,
                                                    alphas).tolist(),
        "hessian_direction_norm": w_norm / 10,
    }
    g2 = torch.linspace(-1.0, 1.0, slice_2d_points)
    d_rand2 = dg.filter_normalized_direction(model, generator=gen)
    out["slice_2d"] = {"alphas": g2.tolist(), "betas": g2.tolist(),
                       "loss": dg.loss_slice_2d(model, loss_fn, batch_list, d_rand, d_rand2,
                                                g2, g2).tolist()}
    curve = dg.perturbation_curve(model, loss_fn, batch_list, [0.0, 0.02, 0.05, 0.1, 0.2, 0.3],
                                  n_draws=perturb_draws, generator=gen)
    out["perturbation"] = curve.to_dict()
    if pac_bayes:
        xs, ys = [], []
        for b in data.train.iter_epoch(0):
            xs.append(b[0])
            ys.append(b[1])
            if sum(int(y.shape[0]) for y in ys) >= pac_samples:
                break
        x, y = torch.cat(xs)[:pac_samples], torch.cat(ys)[:pac_samples]
        out["pac_bayes"] = dg.pac_bayes_bound(model, init, x, y, n_mc=pac_mc,
                                              generator=gen).to_dict()
        out["pac_bayes"]["note"] = ("m is the number of training examples used; the bound holds "
                                    "for the distribution those examples were drawn from")
    out["seconds"] = time.time() - t0
    dest = run_dir / "diagnostics"
    dest.mkdir(exist_ok=True)
    path = dest / "diagnostics.json"
    path.write_text(json.dumps(_finite(out), indent=1) + "\n")
    if png:
        _pngs(out, dest)
    return path


def _finite(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _pngs(out: dict, dest: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are an optional extra
        print("matplotlib is not installed: JSON only (pip install 'dsbp[plots]')")
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    s = out["slice_1d"]
    ax[0].plot(s["alphas"], s["random_filter_normalised"], label="filter-normalised random")
    ax[0].plot(s["alphas"], s["top_hessian_eigenvector"],
               label=f"top Hessian eigenvector (|d| = {s['hessian_direction_norm']:.3g})")
    ax[0].set_xlabel("step along direction, alpha (units of the direction)")
    ax[0].set_ylabel("training loss (cross-entropy, nats)")
    ax[0].legend()
    p = out["perturbation"]
    ax[1].errorbar(p["radii"], p["mean_increase"], yerr=p["std_increase"], marker="o")
    ax[1].set_xlabel("relative perturbation radius r (noise norm / filter norm)")
    ax[1].set_ylabel("loss increase (nats), mean +- std over draws")
    state = "" if out.get("run_status") != "unfinished" else \
        f", UNFINISHED: checkpoint at step {out.get('checkpoint_step')}"
    fig.suptitle(f"{out['method']} on {out['dataset']} (seed {out['seed']}{state})")
    fig.savefig(dest / "landscape_perturbation.png", dpi=120)
    plt.close(fig)
