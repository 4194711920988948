"""The projection of a DSBP step as one replayed CUDA graph. [ours]

On a GPU the projection of a step is ~6 small kernels per group of same-shaped layers, each
launched from Python: on ResNet-18 (batch 512, bf16, H100) that host work, not the GPU's,
made the step 1.35x SGD's (BENCHMARKS.md). Here the kernels of every group are captured once
into a ``torch.cuda.CUDAGraph`` and replayed with one launch per step.

A graph reads and writes fixed addresses, so the graph works on static buffers:

* ``G``: one (B, d_out, d_in) stack per group. Gradients move in with one
  ``torch._foreach_copy_`` before the replay and the projected result moves back with another
  (``zero_grad(set_to_none=True)`` gives every step new ``.grad`` tensors).
* ``E`` (B, d, k) and ``s`` (B,) (sharpness scale ``beta * lambda_1 / trace C``): refilled from
  the layers' bases after every refresh (:meth:`ProjectionGraph.load_bases`), outside the
  graph.
* The weights, read by the sharpness term, are the parameters themselves (updated in place by
  the optimizer, so their addresses do not change; a weight that moves or is replaced changes
  the signature below, and the graph is captured again).

A graph is built for one *signature*: which layers have gradients, their shapes, sides and
ranks, and the projector's switches. When it changes (a layer without a gradient, a new k from
the energy rule) the projector captures a new graph. On a refresh step the eigensolves run
eagerly first; the replay then picks up the new bases. The arithmetic is
``SpectralProjector._project_stack_``, shared with the eager stacked path;
``tests/optim/test_fastpath.py`` checks the replayed result against the reference loop on a
GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsbp.layers import adapters

if TYPE_CHECKING:  # pragma: no cover
    from dsbp.layers.state import LayerState
    from dsbp.optim.projector import SpectralProjector


def signature(proj: SpectralProjector, groups: list[list[LayerState]]) -> tuple:
    """What a captured graph depends on besides the contents of its buffers."""
    return (proj.residual, proj.rescale, proj.max_rescale,
            tuple(tuple((st.name, tuple(st.module.weight.shape), st.side, st.k,
                         st.sharpness != 0.0, st.block.dtype,
                         st.module.weight.data_ptr())  # a weight moved or replaced: recapture
                        for st in g) for g in groups))


def basis_tags(states: list[LayerState]) -> tuple:
    """What the static E and s buffers were filled from: the tensors themselves (held, so that
    their memory cannot be reused by a new basis at the same address), their in-place version
    counters, k and beta. Compared with :func:`same_tags`."""
    return tuple((st.block, st.block._version, st.eigenvalues, st.eigenvalues._version,
                  st.trace, st.k, st.sharpness) for st in states)


def same_tags(a: tuple, b: tuple) -> bool:
    """Tensors compared by identity, everything else by value."""
    return len(a) == len(b) and all(
        len(x) == len(y) and all((u is v) if isinstance(u, torch.Tensor) else (u == v)
                                 for u, v in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True))


class ProjectionGraph:
    """Static buffers and the captured projection of every group of one signature."""

    def __init__(self, proj: SpectralProjector, groups: list[list[LayerState]]) -> None:
        self.proj, self.groups = proj, groups
        self.signature = signature(proj, groups)
        self.G, self.E, self.s = [], [], []
        for sts in groups:
            st0 = sts[0]
            shape = adapters.as_matrix(st0.module.weight).shape
            dt = st0.block.dtype
            dev = st0.module.weight.device
            self.G.append(torch.empty(len(sts), *shape, dtype=dt, device=dev))
            d = shape[0] if st0.side == "output" else shape[1]
            self.E.append(torch.empty(len(sts), d, st0.k, dtype=dt, device=dev))
            self.s.append(torch.zeros(len(sts), dtype=dt, device=dev))
        # per-layer views of the static stacks, in the shape of each layer's gradient
        self._views = [[G[i].view(st.module.weight.shape) for i, st in enumerate(sts)]
                       for G, sts in zip(self.G, groups, strict=True)]
        self._flat_views = [v for vs in self._views for v in vs]
        self._states = [st for sts in groups for st in sts]
        self._tags: tuple = ()
        self.graph: torch.cuda.CUDAGraph | None = None

    # ------------------------------------------------------------------ buffers
    def load_bases(self) -> None:
        """Copy each layer's current basis and sharpness scale into the static buffers (only
        when a refresh changed them since the last load)."""
        tags = basis_tags(self._states)
        if same_tags(tags, self._tags):
            return
        for sts, E, s in zip(self.groups, self.E, self.s, strict=True):
            E.copy_(torch.stack([st.block[:, : st.k] for st in sts]))
            s.copy_(torch.stack([(st.eigenvalues[0] / st.trace * st.sharpness).to(s.dtype)
                                 for st in sts]))
        self._tags = tags

    def _grads(self) -> list[torch.Tensor]:
        return [st.module.weight.grad for st in self._states]

    # ------------------------------------------------------------------ the projection
    def _body(self) -> None:
        """The projection of every group on the static buffers, in place into ``G``."""
        for sts, G, E, s in zip(self.groups, self.G, self.E, self.s, strict=True):
            self.proj._project_stack_(sts, G, E, s)

    def capture(self) -> None:
        """Warm up on a side stream (as ``torch.cuda.graphs`` requires), then capture."""
        self.load_bases()
        torch._foreach_copy_(self._flat_views, self._grads())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast("cuda", enabled=False):
            for _ in range(2):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.autocast("cuda", enabled=False):
            self._body()
        self.graph = graph

    def replay(self) -> None:
        """Project the current gradients: copy in, one graph launch, copy out."""
        self.load_bases()
        grads = self._grads()
        torch._foreach_copy_(self._flat_views, grads)
        self.graph.replay()
        torch._foreach_copy_(grads, self._flat_views)
