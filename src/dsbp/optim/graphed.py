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
eagerly first; the replay then picks up the new bases. The arithmetic is the
projector's ``update_stack_`` (the one update function, shared with the eager stacked path),
passed in: this module imports nothing from the projector. ``tests/optim/test_fastpath.py``
checks the replayed result against the reference loop on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dsbp.layers.state import ParamState

UpdateStack = Callable[[list[ParamState], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def basis_tags(states: list[ParamState]) -> tuple:
    """What the static E and s buffers were filled from: the tensors themselves (held, so that
    their memory cannot be reused by a new basis at the same address), their in-place version
    counters, k and beta. Compared with :func:`same_tags`."""
    return tuple((st.block, st.block._version if st.block is not None else None,
                  st.eigenvalues, st.eigenvalues._version if st.eigenvalues is not None else None,
                  st.trace, st.k, st.sharpness) for st in states)


def same_tags(a: tuple, b: tuple) -> bool:
    """Tensors compared by identity, everything else by value."""
    return len(a) == len(b) and all(
        len(x) == len(y) and all((u is v) if isinstance(u, torch.Tensor) else (u == v)
                                 for u, v in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True))


class ProjectionGraph:
    """Static buffers and the captured projection of every group of one signature.

    Args:
        groups: lists of same-shaped weights' states.
        signature: what the capture depends on besides buffer contents (compared by the
            projector to decide on a new capture).
        local_basis: ``state -> E`` (the rows this rank holds on a sharded output side).
        local: ``tensor -> the part this rank holds`` (the identity without sharding).
        update_stack: the projector's ``update_stack_(states, G, E, s)``.
    """

    def __init__(self, groups: list[list[ParamState]], signature: Any,
                 local_basis: Callable[[ParamState], torch.Tensor],
                 local: Callable[[torch.Tensor], torch.Tensor], update_stack: UpdateStack) -> None:
        self.groups, self.signature = groups, signature
        self.local_basis, self.local, self.update_stack = local_basis, local, update_stack
        self.G: list[torch.Tensor] = []
        self.E: list[torch.Tensor] = []
        self.s: list[torch.Tensor] = []
        for sts in groups:
            E0 = local_basis(sts[0])
            shape = sts[0].matrix(local(sts[0].param)).shape
            dev = sts[0].param.device
            self.G.append(torch.empty(len(sts), *shape, dtype=E0.dtype, device=dev))
            self.E.append(torch.empty(len(sts), *E0.shape, dtype=E0.dtype, device=dev))
            self.s.append(torch.zeros(len(sts), dtype=E0.dtype, device=dev))
        self._states = [st for sts in groups for st in sts]
        self._rows = [G[i] for G, sts in zip(self.G, groups, strict=True) for i in range(len(sts))]
        self._tags: tuple = ()
        self._oks: list[torch.Tensor] = []
        self.graph: torch.cuda.CUDAGraph | None = None

    # ------------------------------------------------------------------ buffers
    def load_bases(self) -> None:
        """Copy each weight's current basis and sharpness scale into the static buffers (only
        when a refresh changed them since the last load)."""
        tags = basis_tags(self._states)
        if same_tags(tags, self._tags):
            return
        for sts, E, s in zip(self.groups, self.E, self.s, strict=True):
            E.copy_(torch.stack([self.local_basis(st) for st in sts]))
            s.copy_(torch.stack([st.sharpness_scale().to(s.dtype) for st in sts]))
        self._tags = tags

    def _copy_in(self) -> list[torch.Tensor]:
        grads = [self.local(st.grad) for st in self._states]
        torch._foreach_copy_(self._rows, [st.matrix(g) for st, g in
                                          zip(self._states, grads, strict=True)])
        return grads

    # ------------------------------------------------------------------ the projection
    def _body(self) -> list[torch.Tensor]:
        """The projection of every group on the static buffers, in place into ``G``."""
        return [self.update_stack(sts, G, E, s)
                for sts, G, E, s in zip(self.groups, self.G, self.E, self.s, strict=True)]

    def capture(self) -> None:
        """Warm up on a side stream (as ``torch.cuda.graphs`` requires), then capture."""
        self.load_bases()
        self._copy_in()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast("cuda", enabled=False):
            for _ in range(2):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.autocast("cuda", enabled=False):
            self._oks = self._body()
        self.graph = graph

    def replay(self) -> list[torch.Tensor]:
        """Project the current gradients: copy in, one graph launch, copy out. Returns the
        per-group finiteness flags (static outputs of the graph)."""
        assert self.graph is not None
        self.load_bases()
        grads = self._copy_in()
        self.graph.replay()
        for st, g, Gi in zip(self._states, grads, self._rows, strict=True):
            st.write_matrix(g, Gi, copy=True)
        return [ok.clone() for ok in self._oks]
