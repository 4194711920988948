"""Spectral architecture optimisation (METHOD.md §2.2): ranks from spectra, factorise or prune.

The paper's "pruning" ablation, in our precise form:

1. :func:`output_spectra`: the full eigen-spectrum of each Linear / Conv2d layer's *output*
   covariance ``C = A^T A`` on calibration batches (conv: one row per sample and position),
   the same covariance DSBP projects with on its output side.
2. :func:`choose_ranks`: per-layer rank ``r_l = rank_for_energy(eigvals, tau_E)``, the fewest
   eigen-directions holding a fraction ``tau_E`` of the output energy.
3. Either
   * :func:`factorize`: replace ``W`` (d_out, d_in) by two thinner layers, ``W ~ E_r (E_r^T W)``:
     a layer with ``r`` outputs and weight ``E_r^T W`` (bias ``E_r^T b``), then a bias-free
     ``r -> d_out`` layer with weight ``E_r`` (conv: a 1x1 conv). The new layer's output is
     exactly ``E_r E_r^T (W x + b)``, the old output projected on its top-r directions.
   * :func:`prune`: keep the ``r_l`` units (channels) with the largest spectral leverage
     ``l_i = sum_{j<r} E[i, j]^2`` (the squared row norms of ``E_r``) **[ours]** and drop the
     rest, slicing the producer's rows, the BatchNorm between and the consumer's columns.
4. Fine-tune (:func:`fine_tune`), then report parameters (:func:`count_params`), FLOPs
   (:func:`count_flops`, analytic per layer), CPU latency (:func:`measure_latency`) and accuracy.

Conventions [ours]: FLOPs are 2 x the multiply-accumulates of Linear and Conv2d layers for one
input sample; biases, norms, activations and pooling are not counted. A layer is only factorised
when that lowers its FLOPs by at least ``min_saving`` (default: any saving).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from dsbp.core.covariance import covariance
from dsbp.core.subspace import rank_for_energy
from dsbp.layers import adapters
from dsbp.layers.hooks import select_layers

__all__ = [
    "Coupling",
    "LayerSpectrum",
    "choose_ranks",
    "count_flops",
    "count_params",
    "factorize",
    "factorize_layer",
    "fine_tune",
    "leverage",
    "measure_latency",
    "output_spectra",
    "prune",
    "prune_units",
    "sequential_couplings",
]


@dataclass
class LayerSpectrum:
    """Full eigen-decomposition of one layer's output covariance.

    Attributes:
        eigenvalues: (d,) float64, descending.
        eigenvectors: (d, d) float64, column i pairs with eigenvalue i.
        rows: number of activation rows that entered ``C``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    rows: int

    def basis(self, r: int) -> torch.Tensor:
        """``E_r`` (d, r): the top-r eigenvectors."""
        return self.eigenvectors[:, :r]


@torch.no_grad()
def output_spectra(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    layers: Iterable[str] | None = None,
    max_rows: int = 8192,
    seed: int = 0,
    center: bool = False,
) -> dict[str, LayerSpectrum]:
    """Eigen-spectra of each layer's output covariance, summed over calibration batches.

    The model runs in eval mode (inference-time activations, BatchNorm running statistics).
    ``C = sum_batches A^T A`` in float64, then ``torch.linalg.eigh`` (layers are small enough:
    d = output width). At most ``max_rows`` rows per layer and batch are used.

    Args:
        model: the trained network.
        batches: input tensors (B, ...) (labels not needed).
        layers: names of the Linear / Conv2d layers (None: all).
        max_rows: row cap per batch and layer (subsampled with a seeded generator).
        seed: seeds the row subsampling.
        center: subtract the mean output first, ``C = sum (a - mu)(a - mu)^T`` [ours: an
            option; METHOD.md's ``A^T A`` is uncentred (the default), so a layer's mean output,
            which a following BatchNorm removes, counts as energy there].

    Returns:
        ``{name: LayerSpectrum}``.
    """
    chosen = select_layers(model, layers)
    covs: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    gen = torch.Generator().manual_seed(seed)

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            A = adapters.rows(module, inputs[0], output, "output", max_rows, gen).double()
            c = covariance(A)
            covs[name] = c if name not in covs else covs[name] + c
            sums[name] = A.sum(0) + sums.get(name, 0.0)
            counts[name] = counts.get(name, 0) + A.shape[0]

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in chosen]
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not covs:
        raise ValueError("output_spectra got no calibration batch")
    out = {}
    for name, C in covs.items():
        if center:
            C = C - torch.outer(sums[name], sums[name]) / counts[name]
        evals, vecs = torch.linalg.eigh(0.5 * (C + C.T))
        out[name] = LayerSpectrum(evals.flip(0).clamp(min=0), vecs.flip(1), counts[name])
    return out


def choose_ranks(spectra: Mapping[str, LayerSpectrum], tau: float) -> dict[str, int]:
    """Per-layer rank ``r_l = rank_for_energy(eigenvalues, tau)`` (energy threshold ``tau_E``)."""
    return {n: rank_for_energy(s.eigenvalues, tau) for n, s in spectra.items()}


# ----------------------------------------------------------------------------- factorisation
def factorize_layer(module: nn.Module, E: torch.Tensor) -> nn.Sequential:
    """Two thinner layers computing ``E E^T (W x + b)`` for a Linear / Conv2d and basis E.

    Args:
        module: ``nn.Linear`` or ``nn.Conv2d`` (groups=1) with weight W (d_out, d_in).
        E: (d_out, r) orthonormal columns (the top-r output eigenvectors).

    Returns:
        ``nn.Sequential(first, second)``: ``first`` has r outputs, weight ``E^T W`` and bias
        ``E^T b``; ``second`` is a bias-free Linear(r, d_out) / 1x1 Conv2d with weight ``E``.
    """
    layer: Any = module  # torch types Module attributes as ``Tensor | Module``
    W = adapters.as_matrix(layer.weight.detach())
    if E.ndim != 2 or E.shape[0] != W.shape[0] or not 1 <= E.shape[1] <= W.shape[0]:
        raise ValueError(
            f"E must be (d_out={W.shape[0]}, r) with 1 <= r <= d_out, got {tuple(E.shape)}"
        )
    r = E.shape[1]
    E = E.to(torch.float64)
    W1 = (E.T @ W.to(torch.float64)).to(layer.weight.dtype)  # (r, d_in)
    b1 = None if layer.bias is None else (E.T @ layer.bias.detach().double()).to(W1.dtype)
    dev, dt = layer.weight.device, layer.weight.dtype
    first: nn.Linear | nn.Conv2d
    second: nn.Linear | nn.Conv2d
    if isinstance(module, nn.Linear):
        first = nn.Linear(module.in_features, r, bias=b1 is not None, device=dev, dtype=dt)
        second = nn.Linear(r, module.out_features, bias=False, device=dev, dtype=dt)
        first.weight.data.copy_(W1)
        second.weight.data.copy_(E.to(W1.dtype))
    elif isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"cannot factorise a grouped conv (groups={module.groups})")
        first = nn.Conv2d(
            module.in_channels,
            r,
            # a Conv2d stores its geometry as 2-tuples (torch types them ``tuple[int, ...]``)
            cast("tuple[int, int]", module.kernel_size),
            cast("tuple[int, int]", module.stride),
            cast("str | tuple[int, int]", module.padding),
            cast("tuple[int, int]", module.dilation),
            bias=b1 is not None,
            padding_mode=module.padding_mode,
            device=dev,
            dtype=dt,
        )
        second = nn.Conv2d(r, module.out_channels, 1, bias=False, device=dev, dtype=dt)
        first.weight.data.copy_(W1.view_as(first.weight))
        second.weight.data.copy_(E.to(W1.dtype).view(module.out_channels, r, 1, 1))
    else:
        raise TypeError(f"cannot factorise a {type(module).__name__}; Linear or Conv2d only")
    if b1 is not None:
        assert first.bias is not None  # built with bias=True just above
        first.bias.data.copy_(b1)
    return nn.Sequential(first, second)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def factorize(
    model: nn.Module,
    spectra: Mapping[str, LayerSpectrum],
    tau: float,
    input_shape: Sequence[int],
    min_saving: float | None = 0.0,
) -> tuple[nn.Module, dict[str, dict]]:
    """A copy of ``model`` with each layer in ``spectra`` factorised at energy threshold ``tau``.

    Args:
        model: the trained network (left unchanged).
        spectra: from :func:`output_spectra`.
        tau: energy threshold tau_E in (0, 1].
        input_shape: one sample's shape (C, H, W), for the FLOP count.
        min_saving: factorise a layer only if it cuts its FLOPs by more than this fraction
            (0.0: any saving); ``None`` factorises every layer regardless.

    Returns:
        ``(new_model, info)`` with ``info[name] = {"rank", "d_out", "factorised", "flops_before",
        "flops_after"}``.
    """
    ranks = choose_ranks(spectra, tau)
    flops = count_flops(model, input_shape)
    new = copy.deepcopy(model)
    info = {}
    for name, r in ranks.items():
        module: Any = new.get_submodule(name)
        d_out = adapters.as_matrix(module.weight).shape[0]
        fac = factorize_layer(module, spectra[name].basis(r))
        after = sum(
            _layer_flops(m, spatial) for m, spatial in _spatial_of(fac, flops[name]["out_spatial"])
        )
        before = flops[name]["flops"]
        do = min_saving is None or after < (1.0 - min_saving) * before
        if do:
            _set_module(new, name, fac)
        info[name] = {
            "rank": r,
            "d_out": d_out,
            "factorised": bool(do),
            "flops_before": before,
            "flops_after": after if do else before,
        }
    return new, info


def _spatial_of(fac: nn.Sequential, out_spatial: int) -> list[tuple[nn.Module, int]]:
    # Both parts of a factorised layer produce the original layer's output positions.
    return [(m, out_spatial) for m in fac]


# ----------------------------------------------------------------------------------- pruning
def leverage(E_r: torch.Tensor) -> torch.Tensor:
    """Spectral leverage of each unit: squared row norms of ``E_r`` (d, r) -> (d,) [ours].

    ``l_i = sum_{j<r} E[i, j]^2`` in [0, 1], summing to r: how much of unit i lies in the top-r
    eigenspace of the layer's output covariance.
    """
    return E_r.pow(2).sum(dim=1)


@dataclass
class Coupling:
    """A producer layer, the BatchNorm after it (or None) and the layer that consumes it.

    ``expand`` is how many consumer input features each producer unit feeds (1 for conv ->
    conv or linear -> linear, H*W when a conv's output is flattened into a Linear).
    """

    producer: str
    norm: str | None
    consumer: str
    expand: int = 1


def sequential_couplings(model: nn.Module) -> list[Coupling]:
    """Producer -> consumer pairs of a feed-forward chain, in module-registration order.

    Assumes the model applies its Linear / Conv2d layers one after another in the order they
    are registered (true for ``SmallCNN`` and ``MLP``; false for residual networks), with only
    BatchNorm, element-wise activations mapping 0 to 0, pooling and flattening between them.
    :func:`prune` checks the result numerically against the masked network.
    """
    mods = list(model.named_modules())
    layers = [(i, n, m) for i, (n, m) in enumerate(mods) if adapters.is_supported(m)]
    out = []
    for (i, n, m), (j, n2, m2) in zip(layers, layers[1:], strict=False):
        d_out = adapters.as_matrix(m.weight).shape[0]
        d_in2 = m2.in_channels if isinstance(m2, nn.Conv2d) else m2.in_features
        if d_in2 % d_out:
            raise ValueError(
                f"{n2!r} has {d_in2} inputs, not a multiple of {n!r}'s {d_out} "
                "outputs: not a feed-forward chain"
            )
        if isinstance(m2, nn.Conv2d) and getattr(m2, "groups", 1) != 1:
            raise ValueError(f"{n2!r} is a grouped conv; pruning its inputs is not supported")
        norm = None
        for name_k, mod_k in mods[i + 1 : j]:
            if isinstance(mod_k, nn.BatchNorm1d | nn.BatchNorm2d) and mod_k.num_features == d_out:
                norm = name_k
        out.append(Coupling(n, norm, n2, d_in2 // d_out))
    return out


def _slice_(p: nn.Parameter | torch.Tensor | None, idx: torch.Tensor, dim: int):
    if p is None:
        return None
    t = p.detach().index_select(dim, idx.to(p.device)).clone()
    return nn.Parameter(t, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else t


def prune_units(model: nn.Module, coupling: Coupling, keep: torch.Tensor) -> None:
    """Keep only units ``keep`` (sorted indices) of ``coupling.producer``, in place.

    Slices the producer's output rows and bias, the BatchNorm's affine parameters and running
    statistics, and the consumer's input columns (``expand`` consecutive columns per unit).
    """
    keep = keep.sort().values.long()
    prod: Any = model.get_submodule(coupling.producer)
    cons: Any = model.get_submodule(coupling.consumer)
    prod.weight = _slice_(prod.weight, keep, 0)
    prod.bias = _slice_(prod.bias, keep, 0)
    if isinstance(prod, nn.Conv2d):
        prod.out_channels = len(keep)
    else:
        prod.out_features = len(keep)
    if coupling.norm is not None:
        bn: Any = model.get_submodule(coupling.norm)
        bn.weight, bn.bias = _slice_(bn.weight, keep, 0), _slice_(bn.bias, keep, 0)
        bn.running_mean = _slice_(bn.running_mean, keep, 0)
        bn.running_var = _slice_(bn.running_var, keep, 0)
        bn.num_features = len(keep)
    e = coupling.expand
    cols = (keep[:, None] * e + torch.arange(e)[None, :]).reshape(-1)
    cons.weight = _slice_(cons.weight, cols, 1)
    if isinstance(cons, nn.Conv2d):
        cons.in_channels = len(keep)
    else:
        cons.in_features = len(cols)


@torch.no_grad()
def _masked(model: nn.Module, coupling: Coupling, drop: torch.Tensor) -> nn.Module:
    """Copy of ``model`` whose ``drop`` units output exactly 0 after their norm (the reference)."""
    m = copy.deepcopy(model)
    prod: Any = m.get_submodule(coupling.producer)
    adapters.as_matrix(prod.weight)[drop] = 0
    if prod.bias is not None:
        prod.bias[drop] = 0
    if coupling.norm is not None:
        bn: Any = m.get_submodule(coupling.norm)
        bn.weight[drop], bn.bias[drop] = 0, 0
    return m


def prune(
    model: nn.Module,
    spectra: Mapping[str, LayerSpectrum],
    tau: float,
    couplings: Sequence[Coupling] | None = None,
    check_input: torch.Tensor | None = None,
) -> tuple[nn.Module, dict[str, dict]]:
    """A copy of ``model`` with the lowest-leverage units of each producer layer removed.

    Each producer keeps ``r_l = rank_for_energy(eigvals, tau)`` units, those with the largest
    leverage in its top-``r_l`` output eigenspace (:func:`leverage`). The last layer (the logits)
    is never pruned: it is no coupling's producer.

    Args:
        model: the trained network (unchanged).
        spectra: :func:`output_spectra` of ``model``.
        tau: energy threshold in (0, 1].
        couplings: producer/consumer pairs (default :func:`sequential_couplings`).
        check_input: optional input batch; in eval mode the pruned model must reproduce the
            model whose dropped units are masked to 0 (to 1e-4 relative), else ValueError
            (it catches couplings that do not describe the network).

    Returns:
        ``(pruned_model, info)`` with ``info[producer] = {"rank", "d_out", "kept"}``.
    """
    couplings = list(couplings) if couplings is not None else sequential_couplings(model)
    new, ref = copy.deepcopy(model), copy.deepcopy(model)
    info = {}
    for c in couplings:
        if c.producer not in spectra:
            continue
        s = spectra[c.producer]
        r = rank_for_energy(s.eigenvalues, tau)
        lev = leverage(s.basis(r))
        keep = torch.argsort(lev, descending=True)[:r].sort().values
        drop = torch.tensor(sorted(set(range(len(lev))) - set(keep.tolist())), dtype=torch.long)
        if len(drop):
            ref = _masked(ref, c, drop)
        prune_units(new, c, keep)
        info[c.producer] = {"rank": r, "d_out": len(lev), "kept": keep.tolist()}
    if check_input is not None:
        new.eval()
        ref.eval()
        with torch.no_grad():
            a, b = new(check_input), ref(check_input)
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())):
            raise ValueError(
                "the pruned network does not match the masked one: the couplings do "
                "not describe this model (pass them explicitly)"
            )
    return new, info


# ------------------------------------------------------------------------- cost and tuning
def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _layer_flops(m: nn.Module, out_spatial: int) -> int:
    if isinstance(m, nn.Linear):
        return 2 * m.in_features * m.out_features * out_spatial
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return 2 * m.out_channels * (m.in_channels // m.groups) * kh * kw * out_spatial
    return 0


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: Sequence[int]) -> dict[str, dict]:
    """Analytic FLOPs of every Linear / Conv2d for one sample of shape ``input_shape``.

    Linear: ``2 d_in d_out`` per position; Conv2d: ``2 C_out (C_in / groups) kh kw H_out W_out``.
    Output sizes come from one forward pass of a zero sample (shapes only).

    Returns:
        ``{name: {"flops": int, "out_spatial": int}}`` (positions = H_out * W_out for a conv,
        the product of the leading non-batch dims for a Linear); the sum is the model's FLOPs.
    """
    out: dict[str, dict] = {}
    handles = []
    for name, m in model.named_modules():
        if adapters.is_supported(m):

            def hook(mod, inputs, output, name=name):
                spatial = (
                    output.shape[2] * output.shape[3]
                    if isinstance(mod, nn.Conv2d)
                    else output[0].numel() // output.shape[-1]
                )
                out[name] = {"flops": _layer_flops(mod, spatial), "out_spatial": spatial}

            handles.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(1, *input_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return out


@torch.inference_mode()
def measure_latency(model: nn.Module, x: torch.Tensor, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall-clock seconds of ``model(x)`` in eval / inference mode over ``repeats`` runs."""
    was = model.training
    model.eval()
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    model.train(was)
    return statistics.median(times)


def fine_tune(
    model: nn.Module,
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int = 1,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> nn.Module:
    """Plain SGD fine-tuning (cross-entropy, constant learning rate) after factorising / pruning.

    Args:
        model: the network to tune, in place.
        batches: ``batches(epoch)`` yields ``(x, y)`` for one epoch (e.g. a
            ``DeviceLoader.iter_epoch``).
        epochs, lr, momentum, weight_decay: SGD settings.

    Returns:
        ``model``.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    for epoch in range(epochs):
        for x, y in batches(epoch):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model
