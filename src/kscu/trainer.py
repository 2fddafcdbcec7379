"""The KSCU erase loop, in one place (KSCU_METHOD.md sections 2-5). It knows no model family.

For each entry (concept c, step index s) of the schedule:
  1. get x_s: the edited model's own guided trajectory for c from seeded noise, advanced one
     step from the previous iteration's x when the schedule moved exactly one step on;
  2. frozen predictions p = eps(x_s, t, c), n = eps(x_s, t, "") from the original weights;
  3. edited predictions e = eps*(x_s, t, c'), u = eps*(x_s, t, "");
  4. one Adam step on MSE(e, n - eta (p - n)) + lambda2 MSE(u, n - lambda1 (p - n)).

Everything that differs between SD, SDXL and FLUX (prompt encoding, the denoiser call, guidance,
the sampler, lambda1, the loss space) comes from the pipeline's family (``kscu.families``).
The frozen model is the same network called with the original values of the trainable tensors
(``torch.func.functional_call``), kept in the compute dtype (as loaded, when loaded in it), so no
module is copied. Trainable tensors are float32 master weights, upcast exactly from the weights
as loaded, whatever the compute dtype: bf16/fp16 only change the arithmetic (autocast), never the
precision of the updates (KSCU_METHOD.md section 8), so the saved weights are exactly base +
update.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from kscu.allocator import heap_free_bytes, host_memory, huge_page_bytes
from kscu.checkpoint import fingerprint, record_run
from kscu.config import EraseConfig, resolve
from kscu.errors import KscuError
from kscu.families import family_of
from kscu.families.base import (
    Cond,
    check_editable,
    check_runs_where_it_sits,
    cond_cat,
    cond_pick,
    offload_modules,
)
from kscu.models import TORCH_DTYPES, cpu_convolution
from kscu.objective import kscu_loss
from kscu.optim import AdamSteps
from kscu.prompts import augmented_prompts
from kscu.schedule import Entry, key_step_table, uniform_table
from kscu.scope import trainable_names


@dataclass
class EraseResult:
    """What an erase produced: the edited tensors and the record of how."""

    config: EraseConfig
    tensors: dict[str, torch.Tensor]  # edited denoiser parameters, float32, on the CPU (see end)
    schedule: list[Entry]
    losses: list[float]
    seconds: float
    base_fingerprint: dict[str, list[float]]  # see kscu.checkpoint.fingerprint
    record: dict[str, Any] = field(default_factory=dict)  # family, timesteps, loss space


def build_schedule(cfg: EraseConfig) -> list[Entry]:
    """KSCU's key step table, or ESD's uniform draw over [start, end)."""
    if cfg.method == "esd":
        return uniform_table(cfg.concepts, cfg.start_step, cfg.end_step, cfg.iterations, cfg.seed)
    return key_step_table(cfg.concepts, cfg.start_step, cfg.end_step, cfg.iterations, cfg.loops)


class _Restore:
    """The caller's network as it was: training flag, requires_grad, trainable values/dtypes."""

    def __init__(self, module: torch.nn.Module, params: dict, names: list[str], exact: dict):
        self.module, self.params, self.exact = module, params, exact
        self.training = module.training
        self.checkpointing = bool(getattr(module, "is_gradient_checkpointing", False))
        self.requires_grad = {n: p.requires_grad for n, p in params.items()}
        self.dtypes = {n: params[n].dtype for n in names}
        self.storage = {n: params[n].data for n in names}  # the caller's, before any master

    def put(self, values: dict[str, torch.Tensor]) -> None:
        """Write ``values`` into the trainable tensors in their own dtypes; flags as they were."""
        for n, v in values.items():
            p = self.params[n]
            p.data = v.detach().to(p.device, self.dtypes[n])
        for n, p in self.params.items():
            p.requires_grad_(self.requires_grad[n])
        self.module.train(self.training)

    def undo(self) -> None:
        """The caller's values back in the caller's storage: a ``state_dict()`` taken before the
        erase shares it, and on a CPU in float32 the steps were written into it (the masters are
        the parameters' own memory), so new storage would leave that backup holding them."""
        with torch.no_grad():
            for n, data in self.storage.items():
                data.copy_(self.exact[n])  # for a tensor given a new master: the same values
        self.put(self.storage)


@torch.inference_mode(False)  # a notebook's no_grad or inference_mode around the call must
@torch.enable_grad()  # not turn the edited forward's graph off (a torch traceback at backward)
def erase(
    pipe: Any,
    config: EraseConfig,
    progress: bool = True,
    callback: Callable[[int, Entry, torch.Tensor, float], None] | None = None,
) -> EraseResult:
    """Erase ``config.concepts`` from the pipeline's denoiser in place; returns the edited tensors.

    ``config`` is resolved here (idempotent); model presets are applied by ``kscu.runner``.
    ``callback(i, (concept, s), x_s, loss)`` sees every iteration (tests use it). On any error
    the pipeline is left as it was; the global torch RNG is never touched.
    """
    family = family_of(pipe, config.family)  # named: a pipeline class kscu does not know
    cfg = resolve(config, family=family)
    started = time.perf_counter()
    net = family.denoiser(pipe)
    check_editable(net, family.denoiser_attr)
    check_runs_where_it_sits(net, family.denoiser_attr)
    compute_dtype = TORCH_DTYPES[cfg.dtype]
    params = dict(net.named_parameters())
    names = trainable_names(net, cfg.scope, family)
    _check_dtypes(params, compute_dtype, family.denoiser_attr)
    base_fp = fingerprint({n: params[n] for n in names})
    original = {n: _frozen(params[n], compute_dtype) for n in names}
    lossy = any(params[n].dtype != compute_dtype for n in names)  # the frozen copy is rounded
    exact = {n: params[n].detach().to("cpu", copy=True) for n in names} if lossy else original
    restore = _Restore(net, params, names, exact)
    for n in names:  # a gradient left from the caller's own training would be added into the
        params[n].grad = None  # first Adam steps (optimizer-in-backward accumulates into it)
    bar, offloaded, adam = None, {}, None
    try:
        net.eval()
        net.requires_grad_(False)
        if cfg.gradient_checkpointing:  # recompute the edited forward's activations in backward
            net.enable_gradient_checkpointing()
        for n in names:  # float32 masters, exact upcasts: lr-sized steps must not round away
            params[n].data = params[n].data.float()
            params[n].requires_grad_(True)

        def autocast():
            if compute_dtype == torch.float32:
                return contextlib.nullcontext()
            # Autocast caches its compute-dtype copies of the float32 masters until the context
            # ends, which outlives the checkpointed blocks that were meant to free them; without
            # the cache each block casts again (the same values) and drops its copies.
            cache = not cfg.gradient_checkpointing
            return torch.autocast(net.device.type, dtype=compute_dtype, cache_enabled=cache)

        sampler = family.sampler(
            pipe, cfg.num_steps, cfg.resolution, cfg.loss_space, guidance=cfg.trajectory_guidance
        )
        if cfg.trace_denoiser:  # the same operations, less Python (exact)
            sampler.replay(net, compute_dtype, cfg.gradient_checkpointing)

        def raw(x, s, cond, frozen: bool = False) -> torch.Tensor:
            """The denoiser's output for rows x at step s, in the sampler's own space."""
            with autocast():
                return sampler.raw(net, x, s, cond, params=original if frozen else None)

        def pair(x, s, first, second, frozen: bool = False):
            """Loss-space predictions for two prompts at the same x, in one batched call."""
            xx = torch.cat([x, x])
            out = raw(xx, s, cond_cat(first, second), frozen)
            return sampler.to_loss_space(out, xx, s).chunk(2)

        def encode(prompts: list[str]):
            return family.encode(pipe, prompts, cfg.max_sequence_length)

        uncond = encode([""])  # every prompt is encoded once, here
        cond = {c: encode([c]) for c in cfg.concepts}
        variants = {
            c: encode(augmented_prompts(c, cfg.mode, cfg.augment_variants, cfg.seed))
            for c in cfg.concepts
        }
        offloaded.update(offload_modules(pipe, net, family.encoder_modules))
        augment_from = cfg.iterations - math.ceil(cfg.augment_fraction * cfg.iterations)
        rng = random.Random(cfg.seed)
        emb_noise = torch.Generator("cpu").manual_seed(cfg.seed)

        def walk(x, s, c):  # x_s -> x_{s+1} with the edited model and the family's guidance
            with torch.inference_mode():  # no_grad without autograd's bookkeeping: same values
                return sampler.guided_step(raw, x, s, cond[c], uncond, cfg.trajectory_guidance)

        # Adam's moments are made here (kscu.optim): after the encoders left the accelerator,
        # before the first forward and outside the allocator's reuse of freed blocks
        scaler = torch.amp.GradScaler(net.device.type) if cfg.dtype == "float16" else None
        adam = AdamSteps(
            [params[n] for n in names],
            cfg.lr,
            cfg.optimizer_in_backward,
            scaler,
            lean_state=cfg.lean_adam,
            offload_state=cfg.offload_adam,
        )
        table = build_schedule(cfg)
        losses: list[float] = []
        x, previous, ticks = None, None, [time.perf_counter()]
        bar = tqdm(table, desc="erase", disable=not progress, dynamic_ncols=True)
        with (
            cpu_convolution(cfg.fast_cpu_conv, net.device) as native_conv,  # opt-in, float32
            host_memory(cfg.reuse_freed_memory, net.device) as allocator,  # CPU, glibc
        ):
            for i, (c, s) in enumerate(bar):
                if cfg.reuse_trajectory and previous == (c, s - 1):
                    x = walk(x, s - 1, c)
                else:
                    x = sampler.noise(cfg.seed + i)
                    for k in range(s):
                        x = walk(x, k, c)
                x = x.clone()  # an ordinary tensor: the edited forward saves it for backward

                with torch.inference_mode():
                    p, n = pair(x, s, cond[c], uncond, frozen=True)
                cond_e = cond[c]
                if cfg.augment and i >= augment_from:
                    cond_e = _variant(variants[c], rng, emb_noise, cfg.embedding_noise_std)
                if cfg.lambda2 == 0:  # ESD: the leakage term is zero, skip its forward pass
                    e, u = sampler.to_loss_space(raw(x, s, cond_e), x, s), None
                else:
                    e, u = pair(x, s, cond_e, uncond)
                lambda1 = sampler.lambda1(s, cfg.lambda1_alpha)
                loss = kscu_loss(e, u, p, n, cfg.negative_guidance, lambda1, cfg.lambda2)
                if not torch.isfinite(loss):
                    raise KscuError(_nonfinite(loss.item(), i, s, cfg.dtype))
                adam.backward(loss)  # gradients and the Adam step (kscu.optim)
                losses.append(loss.item())
                bar.set_postfix(step=s, loss=f"{losses[-1]:.3g}")
                if callback is not None:
                    callback(i, (c, s), x, losses[-1])
                previous = (c, s)
                ticks.append(time.perf_counter())
            heap_free = heap_free_bytes()  # before the allocator setting returns what it kept
            huge = huge_page_bytes()
    except BaseException:
        restore.undo()  # leave the pipeline as it was
        raise
    finally:
        if bar is not None:
            bar.close()
        if adam is not None:
            adam.close()
        if cfg.gradient_checkpointing and not restore.checkpointing:
            net.disable_gradient_checkpointing()
        for name, device in offloaded.items():  # encoders back where the caller had them
            getattr(pipe, name).to(device)

    # On the CPU the result shares memory with the pipeline's parameters (no second copy of
    # every trainable tensor at the peak); clone it to keep it past later edits of the pipeline.
    tensors = {n: params[n].detach().to("cpu", torch.float32) for n in names}
    restore.put({n: params[n] for n in names})
    # a run loaded onto this result later would stack on it unseen (kscu.checkpoint.loaded_runs)
    record_run(net, f"an erase of {', '.join(map(repr, cfg.concepts))} made in place", tensors)
    conv = "torch native (--fast-cpu-conv)" if native_conv else "torch default"
    record = {"family": family.name, **sampler.record(), "convolution": conv}
    record["host_allocator"] = allocator or "system default"
    if net.device.type == "cpu":  # at the loop's end (kscu.allocator), where they can be read
        host = {"host_heap_free_bytes": heap_free, "host_huge_page_bytes": huge}
        record.update({key: n for key, n in host.items() if n is not None})
    record["denoiser_calls"] = sampler.traced.summary() if sampler.traced else "eager"
    # per iteration: the first pays every first touch (gradients, activations; on the plain path
    # torch's Adam state), the rest do not
    record["iteration_seconds"] = [round(b - a, 4) for a, b in itertools.pairwise(ticks)]
    seconds = time.perf_counter() - started
    return EraseResult(cfg, tensors, table, losses, seconds, base_fp, record)


def _check_dtypes(params: dict, compute: torch.dtype, attr: str) -> None:
    """Float32 weights serve any compute dtype (exact masters, autocast for the arithmetic); half
    weights only their own: float32 compute would round nothing back, and under autocast of the
    other half dtype torch's normalisation layers refuse the mix (a traceback mid-forward)."""
    held = {p.dtype for p in params.values() if p.is_floating_point()} - {torch.float32}
    other = sorted(str(d).removeprefix("torch.") for d in held if d != compute)
    if other:
        name = str(compute).removeprefix("torch.")
        raise KscuError(
            f"the {attr} holds {other[0]} weights but the compute dtype is {name}; load it in "
            f"float32 (exact for any compute dtype) or set dtype to {other[0]}"
        )


def _frozen(param: torch.nn.Parameter, compute_dtype: torch.dtype) -> torch.Tensor:
    """The frozen model's copy of a trainable tensor, in the compute dtype.

    Only a float32 tensor keeps its storage when it is upcast to the master (and is then
    stepped in place), so only its frozen copy must be a copy. Any other tensor gets new master
    storage, so one already in the compute dtype (FLUX.1's bf16) is kept as it is: a second copy
    would hold the same values twice, and on a CPU, where safetensors maps the checkpoint's
    file, the loaded pages stay resident beside it (2 bytes per trainable element: 4.7 GiB for
    FLUX.1-dev's attention scope).
    """
    return param.detach().to(compute_dtype, copy=param.dtype == torch.float32)


def _variant(variants: Cond, rng: random.Random, gen: torch.Generator, std: float) -> Cond:
    """One augmented prompt, with Gaussian noise on its text embedding (KSCU_METHOD.md 5).

    The noise is added to the float32 embedding, which enters the network in float32: under
    bf16/fp16 autocast the first projection rounds it, so only elements near a rounding boundary
    change there (measured in tests/test_trainer.py); in float32 every element changes.
    """
    row = rng.randrange(len(variants["encoder_hidden_states"]))
    picked = cond_pick(variants, row)
    emb = picked["encoder_hidden_states"]
    noise = torch.randn(emb.shape, generator=gen) * std
    return {**picked, "encoder_hidden_states": emb + noise.to(emb.device)}


def _nonfinite(value: float, i: int, s: int, dtype: str) -> str:
    if dtype == "float16":
        return (
            f"float16 overflowed in the forward pass (loss {value} at iteration {i}, step {s}); "
            "use --dtype bfloat16 (float32's range at float16's cost) or float32"
        )
    fix = "lower --lr" + (" or use --dtype float32" if dtype != "float32" else "")
    fix += " (or, if you raised them, --negative-guidance, --trajectory-guidance, --lambda1-alpha)"
    return f"loss became {value} at iteration {i} (step {s}); {fix}"
