"""MAML (Finn et al. 2017, arXiv 1703.03400): first- and second-order, with ``torch.func``.

For a task with support set S and query set Q, the inner loop takes ``inner_steps`` gradient
steps from the shared initialisation ``theta``::

    phi_0 = theta,   phi_{j+1} = phi_j - alpha * T(grad L_S(phi_j)),

where ``T`` is the optional ``inner_grad_transform`` (identity by default; the spectral
meta-learning extension passes a projection onto the support set's activation subspace). The
meta-loss is the mean over tasks of ``L_Q(phi_m)``; its gradient w.r.t. ``theta`` is

- **second order** (``first_order=False``): the full derivative, through the inner gradients
  (Hessian-vector products of L_S appear);
- **first order** (FOMAML): inner gradients are treated as constants, so ``d phi_m / d theta = I``
  and the meta-gradient is ``grad L_Q(phi_m)``: no second-order terms.

The model is evaluated at ``phi`` with ``torch.func.functional_call``. In :meth:`MAML.meta_loss`
(a loop over tasks) the inner gradient is ``torch.autograd.grad`` (``create_graph`` for second
order), which works with any module, BatchNorm in training mode included.
:meth:`MAML.meta_loss_batched` is the fast path for same-shaped tasks: ``torch.func.vmap`` over
tasks of a ``torch.func.grad`` inner loop; it refuses modules that update buffers in place
(BatchNorm in training mode), as torch.func does.
Buffers (BatchNorm running statistics) are the model's own and are updated as in a normal
forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = ["MAML", "Params", "GradTransform"]

Params = dict[str, torch.Tensor]
# T(grads) -> grads, keyed by parameter name; it may close over per-task state (e.g. bases).
GradTransform = Callable[[Params], Params]
Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class MAML:
    """Model-agnostic meta-learning around an ``nn.Module``.

    Args:
        model: the network whose parameters are the meta-initialisation ``theta``.
        inner_lr: inner-loop step size (paper symbol alpha). Default 0.01.
        inner_steps: number of inner gradient steps m. Default 1.
        first_order: FOMAML (no gradient through the inner gradients). Default False.
        loss_fn: ``loss_fn(logits, y) -> scalar`` for both loops. Default cross-entropy.
        inner_grad_transform: default ``T``, applied to every inner gradient (a dict of tensors
            keyed by parameter name, returning one of the same shapes). Default None (identity).

    Typical outer loop::

        maml = MAML(model, inner_lr=0.4, inner_steps=1, first_order=False)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for tasks in sampler:                  # tasks: [(support_x, support_y, query_x, query_y)]
            opt.zero_grad()
            maml.meta_loss(tasks).backward()
            opt.step()

    Raises:
        ValueError: on a negative ``inner_lr`` or ``inner_steps``.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        inner_grad_transform: GradTransform | None = None,
    ) -> None:
        if not inner_lr >= 0.0:
            raise ValueError(f"MAML: inner_lr must be >= 0, got {inner_lr}")
        if int(inner_steps) != inner_steps or inner_steps < 0:
            raise ValueError(f"MAML: inner_steps must be an integer >= 0, got {inner_steps}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)
        self.loss_fn = loss_fn
        self.inner_grad_transform = inner_grad_transform

    def params(self) -> Params:
        """The meta-parameters ``theta``: the model's trainable parameters, by name (live)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def loss(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        """``loss_fn(model_phi(x), y)`` with the model evaluated at ``params`` (a scalar tensor).

        Parameters missing from ``params`` (frozen ones) take the model's own values.
        """
        return self.loss_fn(functional_call(self.model, dict(params), (x,), strict=False), y)

    def adapt(
        self,
        params: Mapping[str, torch.Tensor],
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        inner_grad_transform: GradTransform | None = None,
    ) -> Params:
        """Run the inner loop on one task's support set.

        Args:
            params: starting point ``theta`` (usually :meth:`params`), name -> tensor.
            support_x: support inputs (n_s, ...).
            support_y: support targets (n_s,).
            inner_grad_transform: ``T`` for this call (e.g. built from this task's support
                activations); overrides the constructor's. None: use the constructor's.

        Returns:
            The fast weights ``phi_m`` (same keys and shapes). In second-order mode they are
            differentiable functions of ``params``; in first-order mode ``d phi / d theta = I``.
        """
        transform = inner_grad_transform or self.inner_grad_transform
        fast = dict(params)
        if not fast:
            raise ValueError("MAML.adapt: params is empty")
        create_graph = not self.first_order
        # enable_grad: the inner loop needs gradients even when called under no_grad (evaluation).
        with torch.enable_grad():
            for _ in range(self.inner_steps):
                # First order: a fresh leaf per step so the inner gradient has no history.
                inputs = {
                    n: (p if create_graph else p.detach().requires_grad_(True))
                    for n, p in fast.items()
                }
                loss = self.loss(inputs, support_x, support_y)
                grads = torch.autograd.grad(
                    loss, list(inputs.values()), create_graph=create_graph, allow_unused=True
                )
                g = {
                    n: torch.zeros_like(p) if gi is None else gi
                    for (n, p), gi in zip(inputs.items(), grads, strict=True)
                }
                if transform is not None:
                    g = transform(g)
                    if set(g) != set(fast):
                        raise ValueError(
                            "inner_grad_transform must return a grad for every parameter"
                        )
                if not create_graph:
                    g = {n: gi.detach() for n, gi in g.items()}
                fast = {n: p - self.inner_lr * g[n] for n, p in fast.items()}
        return fast

    def meta_loss(self, tasks: Iterable[Task]) -> torch.Tensor:
        """Mean query loss after adaptation, over a batch of tasks (backpropagate this).

        Args:
            tasks: iterable of ``(support_x, support_y, query_x, query_y)``.

        Returns:
            Scalar tensor ``(1/B) sum_t L_Q_t(phi_m^t)``, differentiable w.r.t. the model's
            parameters (second- or first-order, see the module docstring).
        """
        theta = self.params()
        losses = [self.loss(self.adapt(theta, sx, sy), qx, qy) for sx, sy, qx, qy in tasks]
        if not losses:
            raise ValueError("MAML.meta_loss: no tasks")
        return torch.stack(losses).mean()

    def meta_loss_batched(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`meta_loss` for B same-shaped tasks at once, with ``torch.func.vmap`` + ``grad``.

        The fast path for many small tasks (one batched kernel per layer instead of B). Same
        value and gradient as :meth:`meta_loss` on the same tasks, first- or second-order.

        Args:
            support_x: (B, n_s, ...) support inputs; support_y: (B, n_s).
            query_x: (B, n_q, ...) query inputs; query_y: (B, n_q).

        Returns:
            Scalar mean query loss over the B tasks.

        Raises:
            ValueError: if the model has BatchNorm layers in training mode (torch.func cannot
                update running statistics in place; use :meth:`meta_loss`), or the leading
                dimensions disagree.
        """
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                raise ValueError(
                    "meta_loss_batched: BatchNorm in training mode updates buffers in place, "
                    "which torch.func.vmap/grad refuse; use meta_loss, or model.eval()"
                )
        n_tasks = {t.shape[0] for t in (support_x, support_y, query_x, query_y)}
        if len(n_tasks) != 1:
            raise ValueError(f"meta_loss_batched: task dimensions disagree: {sorted(n_tasks)}")
        theta = self.params()
        transform = self.inner_grad_transform

        def task_loss(sx, sy, qx, qy):
            fast = dict(theta)
            for _ in range(self.inner_steps):
                g = torch.func.grad(lambda p: self.loss(p, sx, sy))(fast)
                if transform is not None:
                    g = transform(g)
                if self.first_order:
                    g = {n: gi.detach() for n, gi in g.items()}
                fast = {n: p - self.inner_lr * g[n] for n, p in fast.items()}
            return self.loss(fast, qx, qy)

        with torch.enable_grad():
            losses = torch.func.vmap(task_loss, randomness="different")(
                support_x, support_y, query_x, query_y
            )
        return losses.mean()

    def evaluate(self, tasks: Iterable[Task]) -> tuple[float, float]:
        """Mean query loss and accuracy (fraction) after adaptation, without an outer graph.

        Adaptation uses the same inner loop (first-order gradients are exact for the forward
        values), so this is what a meta-trained model scores on held-out episodes.
        """
        saved, self.first_order = self.first_order, True
        try:
            total_loss, total_acc, n = 0.0, 0.0, 0
            for sx, sy, qx, qy in tasks:
                theta = {k: v.detach() for k, v in self.params().items()}
                fast = self.adapt(theta, sx, sy)
                with torch.no_grad():
                    logits = functional_call(self.model, fast, (qx,), strict=False)
                    total_loss += float(self.loss_fn(logits, qy))
                    total_acc += float((logits.argmax(-1) == qy).float().mean())
                n += 1
        finally:
            self.first_order = saved
        if n == 0:
            raise ValueError("MAML.evaluate: no tasks")
        return total_loss / n, total_acc / n
