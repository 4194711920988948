"""Weight adapters: how each kind of layer turns its weights into matrices and its activations
into rows (the kfac-pytorch adapter idea, as a small registry).

What DSBP projects is a weight matrix. An adapter, registered for a module type, says for each
weight of such a module:

* its (d_out, d_in) matrix view (``matrix``): a conv weight (C_out, C_in, *k) is viewed as
  C_out x (C_in * prod k) (METHOD.md §1); transformers' ``Conv1D`` stores its weight (in, out), so
  its matrix is the transpose;
* its activation rows on each side (``rows``): on the output side the weight's outputs (for a
  conv, one row per sample and position, d = C_out); on the input side its inputs (for a conv,
  im2col patches, the K-FAC "A" factor);
* why it cannot be projected on a side (``skip_reason``), e.g. the input side of a grouped conv.

Built in: ``nn.Linear`` (any leading dims), ``nn.Conv1d/2d/3d`` (input side for 1d/2d only),
``nn.MultiheadAttention`` (``in_proj_weight`` or the separate q/k/v weights, and ``out_proj``,
which MHA calls without running its forward), and transformers' ``Conv1D`` (matched by name, so
transformers is never imported here). Register your own with :func:`register_adapter`.

Rows are subsampled while they are extracted, so a refresh never materialises the full
(N*H*W, d) matrix of a large conv layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

SUPPORTED = (nn.Linear, nn.Conv2d)  # the plain layers the extensions read ``.weight`` of


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` is a plain Linear / Conv2d (the layers the extensions work on)."""
    return isinstance(module, SUPPORTED)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a Linear / Conv weight (or its gradient) as a (d_out, d_in) matrix (no copy)."""
    return t.reshape(t.shape[0], -1)


def dim(module: Any, side: str) -> int:
    """Width ``d`` of the covariance on ``side`` for a Linear / Conv ``module``."""
    W = as_matrix(module.weight)
    return W.shape[0] if side == "output" else W.shape[1]


# ---------------------------------------------------------------------------- row sampling
def _pick(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """``m`` distinct sorted indices out of ``n`` (all of them when m >= n), CPU int64.

    A uniformly random m-subset: every index is drawn with probability exactly m/n, so the
    covariance of the sampled rows stays unbiased. For n <= 16m from a permutation of all n.
    Beyond that without one (a ``randperm`` of ResNet-18's 524288 first-stage rows takes
    milliseconds per layer and refresh; ``benchmarks/row_sampler.py``): about 1.25 m draws with
    replacement, the distinct values kept, more drawn if fewer than m, then a uniformly random m
    of them. The procedure treats every index alike, so the m-subset it returns is uniform.
    O(m log m), which beats the permutation from about n = 16m on.
    """
    if m >= n:
        return torch.arange(n)
    if n <= 16 * m:
        return torch.randperm(n, generator=generator)[:m].sort().values
    distinct = torch.empty(0, dtype=torch.int64)
    while distinct.numel() < m:
        draw = torch.randint(n, (m + m // 4 + 16,), generator=generator)
        distinct = torch.cat([distinct, draw]).unique()
    keep = torch.randperm(distinct.numel(), generator=generator)[:m]
    return distinct[keep].sort().values


def _to(idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Indices to ``device`` without a host synchronisation (a pageable host-to-GPU copy waits
    for the stream, which serialised the forward pass on refresh steps): via pinned memory."""
    if device.type != "cuda":
        return idx.to(device)
    return idx.pin_memory().to(device, non_blocking=True)


def _sample(a: torch.Tensor, max_rows: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``max_rows`` rows of ``a`` (..., d), flattened to (n, d), detached, fp32."""
    a = a.detach().reshape(-1, a.shape[-1])
    return a.index_select(0, _to(_pick(a.shape[0], max_rows, generator), a.device)).float()


def _conv_output_rows(out: torch.Tensor, max_rows: int, gen: torch.Generator) -> torch.Tensor:
    o = out.detach().flatten(2)  # (N, C_out, L)
    N, _, L = o.shape
    flat = _to(_pick(N * L, max_rows, gen), o.device)
    return o[flat // L, :, flat % L].float()  # (m, C_out)


def _out_len(size: int, conv: Any, axis: int) -> int:
    p, d, k, s = conv.padding[axis], conv.dilation[axis], conv.kernel_size[axis], conv.stride[axis]
    return int((size + 2 * p - d * (k - 1) - 1) // s + 1)


def _im2col_rows(conv: Any, x: torch.Tensor, max_rows: int, gen: torch.Generator
                 ) -> torch.Tensor:
    """im2col patches of a Conv1d / Conv2d input, on only enough images to supply ``max_rows``
    rows (x4 for variety), then subsampled."""
    x = x.detach()
    one_d = x.dim() == 3
    kw: dict[str, Any]
    if one_d:  # (N, C, L) as a (N, C, 1, L) image with a (1, k) kernel
        x = x.unsqueeze(2)
        kw = dict(kernel_size=(1, conv.kernel_size[0]), dilation=(1, conv.dilation[0]),
                  padding=(0, conv.padding[0]), stride=(1, conv.stride[0]))
        L = _out_len(x.shape[3], conv, 0)
    else:
        kw = dict(kernel_size=conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                  stride=conv.stride)
        L = _out_len(x.shape[2], conv, 0) * _out_len(x.shape[3], conv, 1)
    N = x.shape[0]
    n_img = min(N, max(1, math.ceil(4 * max_rows / max(L, 1))))
    imgs = _to(_pick(N, n_img, gen), x.device)
    cols = F.unfold(x.index_select(0, imgs), **kw)  # (n_img, C_in*prod k, L)
    return _sample(cols.transpose(1, 2), max_rows, gen)


def rows(module: nn.Module, inp: torch.Tensor, out: torch.Tensor, side: str, max_rows: int,
         generator: torch.Generator) -> torch.Tensor:
    """Activation rows (n, d) of a Linear / Conv layer, at most ``max_rows``, detached, fp32.

    Args:
        module: the Linear or Conv layer.
        inp: its input, (..., d_in) for Linear, (N, C_in, *spatial) for a conv.
        out: its output, (..., d_out) or (N, C_out, *spatial).
        side: ``"output"`` or ``"input"``.
        max_rows: cap on rows; rows beyond it are subsampled without replacement.
        generator: private CPU generator that picks the rows.
    """
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            return _sample(out if side == "output" else inp, max_rows, generator)
        if side == "output":
            return _conv_output_rows(out, max_rows, generator)
        return _im2col_rows(module, inp, max_rows, generator)


# ---------------------------------------------------------------------------- adapters
class WeightAdapter:
    """How one module type's weights become (d_out, d_in) matrices and its activations rows.

    Subclass and override what differs; :func:`register_adapter` makes it apply to a type.
    ``weights`` names the weights by attribute path relative to the module (``"weight"``,
    ``"out_proj.weight"``); ``rows`` receives the module's forward call as a forward hook
    sees it (``args``, ``kwargs``, ``output``).
    """

    input_name = "input"  # keyword of the forward argument that carries the layer's input

    def weights(self, module: nn.Module) -> list[str]:
        """Attribute paths of the weights this adapter projects."""
        return ["weight"]

    def children(self, module: nn.Module) -> list[nn.Module]:
        """Submodules whose weights this adapter handles itself (their own adapter is not used)."""
        return []

    def matrix(self, module: nn.Module, attr: str, t: torch.Tensor) -> torch.Tensor:
        """The (d_out, d_in) view of weight ``attr`` (or its gradient) ``t``; no copy."""
        return as_matrix(t)

    def skip_reason(self, module: nn.Module, attr: str, side: str) -> str | None:
        """Why weight ``attr`` cannot be projected on ``side`` (None: it can)."""
        return None

    def first_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs[self.input_name]

    def rows(self, module: nn.Module, attr: str, args: tuple, kwargs: dict, output: Any,
             side: str, max_rows: int, gen: torch.Generator) -> torch.Tensor | None:
        """Activation rows (n, d) of weight ``attr`` for this forward call (None: none)."""
        return rows(module, self.first_input(args, kwargs), output, side, max_rows, gen)


class LinearAdapter(WeightAdapter):
    """``nn.Linear`` on inputs with any leading dims."""


class ConvAdapter(WeightAdapter):
    """``nn.Conv1d/2d/3d``: output side always; input side (im2col) for 1d/2d with groups=1
    and integer zero padding."""

    def skip_reason(self, module: Any, attr: str, side: str) -> str | None:
        if side != "input":
            return None
        if isinstance(module, nn.Conv3d):
            return "Conv3d: the input side needs im2col, which torch defines for 1d/2d only"
        if module.groups != 1:
            return (f"input side (im2col) needs groups=1, this conv has groups={module.groups}; "
                    "use side='output'")
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return (f"input side supports integer zero padding only (padding={module.padding!r}, "
                    f"padding_mode={module.padding_mode!r})")
        return None


class TransposedLinearAdapter(WeightAdapter):
    """transformers' ``Conv1D``: ``y = x W + b`` with W stored (in, out)."""

    input_name = "x"

    def matrix(self, module: nn.Module, attr: str, t: torch.Tensor) -> torch.Tensor:
        return t.t()

    def rows(self, module: nn.Module, attr: str, args: tuple, kwargs: dict, output: Any,
             side: str, max_rows: int, gen: torch.Generator) -> torch.Tensor | None:
        a = output if side == "output" else self.first_input(args, kwargs)
        with torch.no_grad():
            return _sample(a, max_rows, gen)


class MultiheadAttentionAdapter(WeightAdapter):
    """``nn.MultiheadAttention``: the input projection(s) and ``out_proj``.

    MHA hands its weights to ``F.multi_head_attention_forward``, so ``out_proj``'s own forward
    (and hook) never runs: this adapter reads everything from MHA's call.

    * ``in_proj_weight`` (3E, E): input rows are the query, key and value tokens (pooled; once
      when they are the same tensor). Output rows: for self-attention (query is key is value)
      ``x W^T + b``; otherwise each token set's projection in its own block of the 3E outputs,
      zeros elsewhere (the three maps see different tokens, so their cross-covariance is not
      defined) [ours].
    * ``q/k/v_proj_weight`` (when ``kdim`` or ``vdim`` differ from ``embed_dim``): each on its own
      input (query, key, value).
    * ``out_proj.weight``: output rows are MHA's output. Its input (the heads' concatenated
      values) never leaves the fused function, so the input side is not available.
    """

    def weights(self, module: Any) -> list[str]:
        names = (["in_proj_weight"] if module.in_proj_weight is not None
                 else ["q_proj_weight", "k_proj_weight", "v_proj_weight"])
        return names + ["out_proj.weight"]

    def children(self, module: Any) -> list[nn.Module]:
        return [module.out_proj]

    def skip_reason(self, module: nn.Module, attr: str, side: str) -> str | None:
        if attr == "out_proj.weight" and side == "input":
            return ("MultiheadAttention does not expose out_proj's input (the fused attention "
                    "keeps it); use side='output'")
        return None

    @staticmethod
    def _qkv(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        names = ("query", "key", "value")
        vals = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
        return vals[0], vals[1], vals[2]

    def rows(self, module: Any, attr: str, args: tuple, kwargs: dict, output: Any,
             side: str, max_rows: int, gen: torch.Generator) -> torch.Tensor | None:
        with torch.no_grad():
            if attr == "out_proj.weight":
                out = output[0] if isinstance(output, tuple) else output
                return _sample(out, max_rows, gen)
            q, k, v = self._qkv(args, kwargs)
            E = module.embed_dim
            bias = module.in_proj_bias
            if attr != "in_proj_weight":  # separate q / k / v weights
                i = ("q_proj_weight", "k_proj_weight", "v_proj_weight").index(attr)
                x = (q, k, v)[i]
                if side == "input":
                    return _sample(x, max_rows, gen)
                W = getattr(module, attr)
                b = None if bias is None else bias[i * E:(i + 1) * E]
                return _sample(F.linear(x.detach(), W, b), max_rows, gen)
            qkv = (q, k, v)
            distinct = [t for j, t in enumerate(qkv) if all(t is not u for u in qkv[:j])]
            if side == "input":
                return torch.cat([_sample(t, max_rows, gen) for t in distinct])
            W = module.in_proj_weight
            if len(distinct) == 1:
                return _sample(F.linear(q.detach(), W, bias), max_rows, gen)
            blocks = []
            for i, x in enumerate((q, k, v)):
                b = None if bias is None else bias[i * E:(i + 1) * E]
                y = _sample(F.linear(x.detach(), W[i * E:(i + 1) * E], b), max_rows, gen)
                full = y.new_zeros(y.shape[0], 3 * E)
                full[:, i * E:(i + 1) * E] = y
                blocks.append(full)
            return torch.cat(blocks)


_REGISTRY: dict[type | str, WeightAdapter] = {}


def register_adapter(module_type: type | str, adapter: WeightAdapter) -> None:
    """Make ``adapter`` handle modules of ``module_type`` (and its subclasses).

    ``module_type`` is a class, or a qualified class name (``"package.module.Class"``) matched
    without importing it. The most specific registered class in a module's MRO wins.

    Example::

        class MyLayerAdapter(dsbp.layers.adapters.WeightAdapter):
            def rows(self, module, attr, args, kwargs, output, side, max_rows, gen): ...
        dsbp.layers.adapters.register_adapter(MyLayer, MyLayerAdapter())
    """
    if not isinstance(adapter, WeightAdapter):
        raise TypeError(f"adapter must be a WeightAdapter, got {type(adapter).__name__}")
    _REGISTRY[module_type] = adapter


def unregister_adapter(module_type: type | str) -> None:
    """Undo :func:`register_adapter` for ``module_type`` (a KeyError if none is registered)."""
    del _REGISTRY[module_type]


def adapter_for(module: nn.Module) -> WeightAdapter | None:
    """The adapter registered for ``module``'s type (None: no adapter)."""
    for cls in type(module).__mro__:
        hit = _REGISTRY.get(cls) or _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}")
        if hit is not None:
            return hit
    return None


register_adapter(nn.Linear, LinearAdapter())
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_adapter(_conv, ConvAdapter())
register_adapter(nn.MultiheadAttention, MultiheadAttentionAdapter())
register_adapter("transformers.pytorch_utils.Conv1D", TransposedLinearAdapter())


def resolve(module: nn.Module, attr: str) -> tuple[nn.Module, str]:
    """The module that directly owns weight ``attr`` (``"out_proj.weight"``) and its name."""
    *path, leaf = attr.split(".")
    owner: Any = module
    for p in path:
        owner = getattr(owner, p)
    return owner, leaf


def parametrized_reason(module: nn.Module, attr: str) -> str | None:
    """Why a weight is not a plain parameter (parametrizations, old-style weight_norm)."""
    owner, leaf = resolve(module, attr)
    if parametrize.is_parametrized(owner, leaf):
        plist: Any = owner.parametrizations
        kinds = ", ".join(type(p).__name__ for p in plist[leaf])
        return (f"parametrized weight ({kinds}): its gradient belongs to the parametrization's "
                "original tensors, not projected")
    if not isinstance(getattr(owner, leaf, None), nn.Parameter):
        return ("not a Parameter (computed from others, e.g. torch.nn.utils.weight_norm); "
                "not projected")
    return None


def why_not(module: nn.Module, side: str) -> str:
    """Why ``module`` has no weight to project on ``side`` (for error messages)."""
    adapter = adapter_for(module)
    if adapter is None:
        return f"{type(module).__name__} has no weight adapter (see register_adapter)"
    for attr in adapter.weights(module):
        reason = parametrized_reason(module, attr) or adapter.skip_reason(module, attr, side)
        if reason is not None:
            return reason
    return f"its weights are not among the parameters given ({type(module).__name__})"


def check_module(module: nn.Module, side: str, name: str = "") -> None:
    """Raise a clear error for a layer explicitly chosen that cannot be projected on ``side``."""
    adapter = adapter_for(module)
    if adapter is None:
        raise TypeError(f"layer {name!r} is a {type(module).__name__}, for which no weight "
                        "adapter is registered (see dsbp.layers.adapters.register_adapter)")
    for attr in adapter.weights(module):
        reason = adapter.skip_reason(module, attr, side)
        if reason is not None:
            raise ValueError(f"{type(module).__name__} {name!r}: {reason}")

