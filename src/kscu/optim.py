"""How the erase loop's Adam steps are taken: the same Adam update, in less memory.

By default every trainable tensor is stepped as soon as its gradient is complete
(optimizer-in-backward: a post-accumulate-grad hook per parameter), and the gradient is freed
right after, so the gradients of all trainable tensors never live at once: for SD v1.4's class
scope that is 3.3 GB of float32 gradients that a plain ``loss.backward(); optimizer.step()``
holds at its peak. Adam is elementwise, so stepping tensor by tensor is the same update; with
torch's fused kernel (CUDA and CPU) each step is one kernel. Under float16 the loss scaler must
see all gradients before any step (to skip a step on overflow), so that path steps them together.
"""

from __future__ import annotations

import torch


class AdamSteps:
    """Adam over ``params``; ``backward(loss)`` computes the gradients and applies the step."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        lr: float,
        in_backward: bool = True,
        scaler: torch.amp.GradScaler | None = None,
    ):
        self.scaler = scaler
        self.in_backward = in_backward and scaler is None
        fused = _fused_available(params)
        if self.in_backward:
            self.optimizers = [torch.optim.Adam([p], lr=lr, fused=fused) for p in params]
            self.hooks = [
                p.register_post_accumulate_grad_hook(_step_and_free(opt))
                for p, opt in zip(params, self.optimizers, strict=True)
            ]
        else:
            self.optimizers = [torch.optim.Adam(params, lr=lr, fused=fused)]
            self.hooks = []

    def backward(self, loss: torch.Tensor) -> None:
        if self.in_backward:
            loss.backward()  # each tensor is stepped by its hook as its gradient completes
            return
        (optimizer,) = self.optimizers
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()

    def close(self) -> None:
        """Remove the hooks: the caller's parameters must not step on a later backward."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def _step_and_free(optimizer: torch.optim.Optimizer):
    def hook(param: torch.Tensor) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return hook


def _fused_available(params: list[torch.nn.Parameter]) -> bool:
    """torch's fused Adam takes float tensors on CUDA and (since 2.4) on the CPU."""
    if not params:
        return False
    device = params[0].device.type
    if device == "cuda":
        return True
    if device != "cpu":
        return False
    probe = torch.nn.Parameter(torch.zeros(1))
    try:
        torch.optim.Adam([probe], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True
