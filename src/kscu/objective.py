"""The KSCU loss (KSCU_METHOD.md section 2).

The first term is ESD's negative guidance: the edited conditional prediction is pushed to where
classifier-free guidance would steer *away* from the concept. The second term keeps the edited
model's unconditional prediction close to the frozen one, nudged slightly away from the concept,
so the concept does not leak back in through the unconditional branch of CFG. Its weight grows
as t falls (SD: lambda1 = (T - t) * alpha), i.e. toward the detail-forming late steps; the
family's sampler gives lambda1 of each step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def erase_target(p: torch.Tensor, n: torch.Tensor, eta: float) -> torch.Tensor:
    """Negative guidance: the unconditional prediction moved away from the concept by eta."""
    return n - eta * (p - n)


def kscu_loss(
    e: torch.Tensor,
    u: torch.Tensor | None,
    p: torch.Tensor,
    n: torch.Tensor,
    eta: float,
    lambda1: float,
    lambda2: float,
) -> torch.Tensor:
    """MSE(e, n - eta (p - n)) + lambda2 * MSE(u, n - lambda1 (p - n)), in float32.

    ``lambda1`` is the family's weight for this step (SD: (T - t) * 2e-5). ``u`` may be None
    when ``lambda2 == 0`` (ESD): the second term is then exactly zero, so the edited
    unconditional prediction need not be computed at all.
    """
    e, p, n = e.float(), p.float(), n.float()
    loss = F.mse_loss(e, erase_target(p, n, eta))
    if lambda2 != 0:
        if u is None:
            raise ValueError("lambda2 != 0 needs the edited unconditional prediction u")
        loss = loss + lambda2 * F.mse_loss(u.float(), erase_target(p, n, lambda1))
    return loss
