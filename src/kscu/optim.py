"""How the erase loop's Adam steps are taken: the same Adam update, in less memory.

By default every trainable tensor is stepped as soon as its gradient is complete
(optimizer-in-backward: a post-accumulate-grad hook per parameter), and the gradient is freed
right after, so the gradients of all trainable tensors never live at once: for SD v1.4's class
scope that is 3.3 GB of float32 gradients that a plain ``loss.backward(); optimizer.step()``
holds at its peak. Adam is elementwise, so stepping tensor by tensor is the same update; with
torch's fused kernel (CUDA and CPU) each step is one kernel. Tensors of at most ``SMALL_TENSOR``
elements (biases, norms, a small model's layers) are stepped together right after the backward,
in one call of the same kernel: on the bundled tiny model, whose trainable tensors are nearly all
small, one call per tensor cost more than the arithmetic. Their gradients live until then (1 MB
for SD v1.4's class scope: 172 of its 388 tensors). Under float16 the loss scaler must see all
gradients before any step (to skip a step on overflow), so that path steps them together.

The hooked steps and ``LeanAdam`` make their moments when they are set up, just before the erase
loop (zeros, as torch's Adam makes them at its first step, so the same update), not in the first
backward's hooks: made there, they landed among that backward's activations, and on a CPU erase,
whose freed blocks stay in glibc's heap for reuse (``kscu.allocator``), later iterations could not
fill the holes around them. Made first, the large ones are mapped apart from the heap (glibc's
default until the erase loop starts): on FLUX-width blocks with checkpointing, two runs each way,
a joint block's share of the resident set went from 1.81-1.93 to 1.61-1.62 GiB (plan 1.50;
README, Performance). The plain path keeps ``torch.optim.Adam``, which makes them at its step.

``offload_state`` keeps Adam's two moments in host memory (pinned when the device is a GPU) and
moves one tensor's moments to the device for its step and back: the same kernel on the same
values, so the same update, with 8 bytes per trainable element off the device (18.7 GiB for
FLUX.1-dev's attention scope) for 16 bytes per element of host-device traffic per iteration.
On a CPU erase the moments are in host memory already; the copies are then pure cost.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch.optim.adam import adam as functional_adam

SMALL_TENSOR = 2**16  # elements (256 KiB of float32 gradient): stepped together after backward


def steps_together(numel: int, lean_state: bool = False, offload_state: bool = False) -> bool:
    """Whether a tensor's exact step waits for the end of the backward, with the other small ones.

    Lean steps keep a seed each, offloaded ones one tensor's moments on the device: both per tensor.
    """
    return numel <= SMALL_TENSOR and not lean_state and not offload_state


class AdamSteps:
    """Adam over ``params``; ``backward(loss)`` computes the gradients and applies the step."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        lr: float,
        in_backward: bool = True,
        scaler: torch.amp.GradScaler | None = None,
        lean_state: bool = False,
        offload_state: bool = False,
    ):
        self.params, self.scaler = params, scaler
        self.in_backward = in_backward and scaler is None
        fused = _fused_available(params)

        def adam(group: list[torch.nn.Parameter], seed: int = 0) -> torch.optim.Optimizer:
            if lean_state:  # stepped per tensor: a seed each, so equal shapes draw unlike noise
                return LeanAdam(group, lr=lr, seed=seed)
            return torch.optim.Adam(group, lr=lr, fused=fused)

        self.waiting: list[tuple[TensorAdam, torch.Tensor]] = []  # small tensors' steps
        self.hooks = []
        if self.in_backward:
            steps = []  # every moment first: running out of memory here leaves no hook behind
            for i, p in enumerate(params):
                if lean_state:
                    steps.append(_step_and_free(adam([p], i)))
                elif steps_together(p.numel(), lean_state, offload_state):
                    steps.append(functools.partial(self._wait, TensorAdam(p, lr, fused)))
                else:
                    steps.append(TensorAdam(p, lr, fused, offload_state))
            for p, step in zip(params, steps, strict=True):
                self.hooks.append(p.register_post_accumulate_grad_hook(step))
        else:
            self.optimizers = [adam(params)]

    def _wait(self, stepper: TensorAdam, p: torch.Tensor) -> None:
        self.waiting.append((stepper, p))

    def backward(self, loss: torch.Tensor) -> None:
        if self.in_backward:
            loss.backward()  # each large tensor is stepped by its hook as its gradient completes
            if self.waiting:  # the small ones together, in one kernel call
                TensorAdam.step(*zip(*self.waiting, strict=True))
                self.waiting.clear()
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
        """Remove the hooks and the gradients: the caller's parameters must not step on a later
        backward, nor start one from this erase's gradients (the plain path's last ones, or the
        small tensors' of a backward that raised before their step)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        self.waiting.clear()
        for p in self.params:
            p.grad = None


class TensorAdam:
    """One tensor's Adam, stepped by its gradient hook and then freeing the gradient.

    The step is torch's own functional Adam, the function ``torch.optim.Adam.step`` calls with
    the same state (two moments, a float32 step count), defaults and kernel (fused where torch
    has one), so the update is the same; it skips the optimizer wrapper, whose per-call work
    (hooks, profiler ranges, ``zero_grad``) cost more than the step itself on a small model.
    With ``offload`` the moments live in host memory and visit the device for the step only.
    """

    def __init__(
        self,
        p: torch.Tensor,
        lr: float,
        fused: bool,
        offload: bool = False,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.lr, self.fused, self.offload, self.betas, self.eps = lr, fused, offload, betas, eps
        self.state = self._new_state(p)

    def _new_state(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step = torch.zeros((), dtype=torch.float32, device=p.device if self.fused else "cpu")
        if self.offload:  # host memory, page-locked beside a GPU so the copies run asynchronously
            pinned = p.device.type == "cuda"
            zeros = [torch.zeros(p.shape, dtype=p.dtype, pin_memory=pinned) for _ in range(2)]
        else:
            zeros = [torch.zeros_like(p, memory_format=torch.preserve_format) for _ in range(2)]
        return (*zeros, step)

    def __call__(self, p: torch.Tensor) -> None:
        """A gradient hook: this tensor's step, now."""
        TensorAdam.step([self], [p])

    @staticmethod
    @torch.no_grad()
    def step(steppers: Sequence[TensorAdam], params: Sequence[torch.Tensor]) -> None:
        """Each tensor's step with its own stepper's state, in one kernel call; frees the grads.

        The steppers share lr, betas, eps and kernel (one ``AdamSteps``); a fused call over a list
        computes every element as a call per tensor would.
        """
        first = steppers[0]
        homes = [stepper.state for stepper in steppers]
        ms, vs = [h[0] for h in homes], [h[1] for h in homes]
        if first.offload:  # the moments onto the device, for the step only
            ms, vs = ([_beside(p, s) for p, s in zip(params, ss, strict=True)] for ss in (ms, vs))
        functional_adam(
            list(params), [p.grad for p in params], ms, vs, [], [h[2] for h in homes],
            foreach=False, fused=first.fused, amsgrad=False, beta1=first.betas[0],
            beta2=first.betas[1], lr=first.lr, weight_decay=0.0, eps=first.eps, maximize=False,
        )  # fmt: skip
        if first.offload:  # back home; the stream orders the next read after these copies
            for home, m, v in zip(homes, ms, vs, strict=True):
                home[0].copy_(m, non_blocking=True)
                home[1].copy_(v, non_blocking=True)
        for p in params:
            p.grad = None


def _beside(p: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(p).copy_(state, non_blocking=True)


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


class LeanAdam(torch.optim.Optimizer):
    """Adam whose two moments are stored in bf16 with stochastic rounding (opt-in, not exact).

    Half of Adam's 8 bytes per trainable element. The update is computed in float32 from the
    float32 gradient and the float32 master weight, as torch's Adam computes it; only the stored
    moments are rounded, stochastically, so that they stay unbiased on average (a deterministic
    bf16 rounding would freeze a slowly growing second moment). Its effect on an erase is
    measured in benchmarks/lean_adam.py and stated in the README.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, seed: int = 0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        # the noise is drawn where the moments live: no per-step host-to-device copy on a GPU
        device = self.param_groups[0]["params"][0].device
        self.generator = torch.Generator(device).manual_seed(seed)
        for group in self.param_groups:  # before the first forward, as TensorAdam's
            for p in group["params"]:
                zeros = [torch.zeros_like(p, dtype=torch.bfloat16) for _ in range(2)]
                self.state[p] = {"step": 0, "m": zeros[0], "v": zeros[1]}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                g = p.grad.float()
                m = state["m"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = state["v"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                t = state["step"]
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - b1**t))
                state["m"].copy_(stochastic_bf16(m, self.generator))  # in place: no churn
                state["v"].copy_(stochastic_bf16(v, self.generator))


def stochastic_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 -> bf16, rounding up with probability equal to the dropped fraction."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device
    )
    rounded = (bits + noise) & ~0xFFFF
    return rounded.view(torch.float32).to(torch.bfloat16)
