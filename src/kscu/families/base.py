"""What every model family provides: the one interface the erase loop, generation and analysis use.

KSCU itself (the Key Step Table, trajectory reuse, the two-term loss, augmentation, Adam) is the
same for every text-to-image model whose sampler walks a fixed list of steps (KSCU_METHOD.md
section 9). What differs (how a model is loaded, how prompts become conditioning, how the
denoiser is called, how guidance is applied, the sampler, lambda1, the scopes and the default
tables) lives behind this interface, one module per family.

Conditioning is a ``Cond``: a dict of tensors whose first dimension is the batch (one row per
prompt), so rows of different prompts can be concatenated for one batched denoiser call.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from kscu.errors import KscuError
from kscu.protocol import MAX_RESOLUTION_FACTOR
from kscu.tracing import TracedDenoiser, traceable

Cond = dict[str, torch.Tensor]
# raw(x, s, cond) -> the denoiser's output for rows x at step index s, float32
RawFn = Callable[[torch.Tensor, int, Cond], torch.Tensor]


def cond_cat(*conds: Cond) -> Cond:
    """Rows of several conditionings, stacked in the given order."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_rows(cond: Cond, n: int) -> Cond:
    """``cond`` for ``n`` rows: a one-row conditioning is repeated (views, no copies)."""
    return {k: v if len(v) == n else v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def cond_pick(cond: Cond, index: int) -> Cond:
    """Row ``index`` of a conditioning, kept as a batch of one."""
    return {k: v[index : index + 1] for k, v in cond.items()}


def offload_modules(pipe: Any, denoiser: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
    """Move the named components (text encoders, VAE) to the host once prompts are encoded.

    The erase needs only the denoiser on the accelerator; returns where each component was, so
    the caller can put it back. Nothing moves when the denoiser is on the CPU.
    """
    if denoiser.device.type == "cpu":
        return {}
    moved = {}
    for name in names:
        module = getattr(pipe, name, None)
        if module is not None:
            moved[name] = module.device
            module.to("cpu")
    return moved


def unwrapped(module: nn.Module) -> nn.Module:
    """The network itself under ``torch.compile``'s wrapper (``pipe.unet = torch.compile(...)``):
    its parameters carry the wrapper's ``_orig_mod.`` prefix, which no checkpoint of the plain
    network has, and they are the same tensors."""
    return getattr(module, "_orig_mod", module)


def check_editable(net: nn.Module, attr: str) -> None:
    """Refuse a denoiser held in a state whose weights an erase (or ``load_erased``) cannot edit
    as the base model's: each would fail deep in torch or, worse, edit something else silently.

    - LoRA adapters (diffusers/peft ``load_lora_weights``, ``add_adapter``): their layers match
      the scopes, so the adapter would be trained and its keys saved, which no base model has;
    - parameters on the meta device (``enable_sequential_cpu_offload``): accelerate keeps the
      values elsewhere, so a copy into them does nothing;
    - fused attention projections (``fuse_qkv_projections``): the fused layer would be trained
      and unfusing brings back the unedited ones.
    """
    if getattr(net, "peft_config", None):
        adapters = ", ".join(map(str, net.peft_config))
        raise KscuError(
            f"the {attr} holds LoRA adapters ({adapters}); fuse them into the weights and unload "
            "them first (pipe.fuse_lora(); pipe.unload_lora_weights())"
        )
    if any(p.is_meta for p in net.parameters()):
        raise KscuError(
            f"the {attr}'s weights are on the meta device (enable_sequential_cpu_offload?); "
            "erase or load_erased before enabling offload, on a pipeline that holds its weights"
        )
    if any(getattr(m, "fused_projections", False) for m in net.modules()):
        raise KscuError(
            f"the {attr}'s attention projections are fused (fuse_qkv_projections); call "
            "pipe.unfuse_qkv_projections() first"
        )


def check_runs_where_it_sits(net: nn.Module, attr: str) -> None:
    """An erase makes its masters and Adam state where the denoiser sits; model offload
    (``enable_model_cpu_offload`` on a GPU) moves it elsewhere at each call, so refuse that (on a
    CPU-only machine the hook runs it where it is, which works; ``load_erased`` only copies
    values in, which works either way)."""
    runs_on = getattr(getattr(net, "_hf_hook", None), "execution_device", None)
    if runs_on is not None and torch.device(runs_on).type != net.device.type:
        raise KscuError(
            f"the {attr} sits on {net.device.type} and runs on {torch.device(runs_on)} "
            "(enable_model_cpu_offload); call pipe.remove_all_hooks() and pipe.to(device) "
            "first, or erase before enabling offload"
        )


def call_module(module: nn.Module, params: dict[str, torch.Tensor] | None, **kwargs) -> Any:
    """Call ``module`` with its own weights, or with ``params`` in place of some of them.

    The frozen original is the edited module called with the original values of the trainable
    tensors, so no copy of the network is ever made.
    """
    if params is None:
        return module(**kwargs)
    return functional_call(module, params, args=(), kwargs=kwargs, strict=False)


def sampling_resolution(family: Any, pipe: Any, resolution: int | None) -> int:
    """``resolution`` (None: the family's default for this model), refused past
    ``MAX_RESOLUTION_FACTOR`` times the native size before any tensor of that size is made."""
    native = family.native_resolution(pipe)
    limit = MAX_RESOLUTION_FACTOR * native
    if resolution is not None and resolution > limit:
        raise KscuError(
            f"--resolution {resolution} is over {MAX_RESOLUTION_FACTOR}x this model's native "
            f"{native} px; give at most {limit}"
        )
    return resolution or family.default_resolution(pipe)


class Sampler:
    """A family's sampler for one model, step count and resolution.

    ``timesteps[s]`` is what step index ``s`` means to the model; ``noise`` draws the seeded
    start; ``raw`` makes one denoiser call; ``to_loss_space`` states the space the KSCU loss is
    computed in; ``guided_step`` is one sampling step with the family's guidance. Every walk in
    kscu (the erase trajectory, analysis, preview, generation for evaluation) goes through it.
    """

    timesteps: list[float]
    loss_space: str
    resolution: int  # the image size the sampler works at, in pixels
    scheduler: Any  # the diffusers scheduler whose timesteps (and, SD, steps) the walk follows
    traced: TracedDenoiser | None = None  # set by a caller to replay recorded calls (exact)

    def noise(self, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def raw(
        self, module: nn.Module, x: torch.Tensor, s: int, cond: Cond, params=None
    ) -> torch.Tensor:
        raise NotImplementedError

    def replay(
        self,
        module: nn.Module,
        dtype: torch.dtype,
        checkpointing: bool = False,
        records: TracedDenoiser | None = None,
    ) -> None:
        """Replay ``module``'s calls from records from now on, where that is exact and pays
        (``kscu.tracing.traceable``: a CPU, float32, no gradient checkpointing). ``records``:
        those of earlier walks of the same module (each structure is recorded once)."""
        if traceable(module, dtype, checkpointing):
            same = records is not None and records.module is module
            self.traced = records if same else TracedDenoiser(module)

    def call(self, module: nn.Module, params: dict[str, torch.Tensor] | None, **kwargs) -> Any:
        """The denoiser call every ``raw`` makes: replayed from a record when one was set up for
        this module (``kscu.tracing``), else ``call_module``."""
        if self.traced is not None and self.traced.module is module:
            return self.traced(params, kwargs)
        return call_module(module, params, **kwargs)

    def to_loss_space(self, out: torch.Tensor, x: torch.Tensor, s: int) -> torch.Tensor:
        raise NotImplementedError

    def network_dtype(self, module: nn.Module) -> torch.dtype:
        """``module.dtype``, looked up once per network while this sampler lives.

        diffusers' property walks every submodule on each call (3% of an ESD erase on the
        bundled world, once per denoiser call); a network's dtypes do not change during a walk.
        """
        cache = self.__dict__.get("_dtypes")
        if cache is None:  # families' samplers have their own __init__: made on first use
            cache = self._dtypes = weakref.WeakKeyDictionary()
        if module not in cache:
            cache[module] = module.dtype
        return cache[module]

    def guided_step(
        self, raw: RawFn, x: torch.Tensor, s: int, cond: Cond | None, uncond: Cond, scale: float
    ) -> torch.Tensor:
        raise NotImplementedError

    def lambda1(self, s: int, alpha: float) -> float:
        raise NotImplementedError

    def decode(self, pipe: Any, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scheduler_record(self) -> dict[str, Any]:
        """The scheduler's class and settings as the walk uses them (SD's pinned DDIM, not the
        model's own scheduler; FLUX's flow-matching Euler), for ``generate.json``."""
        config = {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}
        return {"class": type(self.scheduler).__name__, "config": config}

    def record(self) -> dict[str, Any]:
        """What the run's JSON states about the sampler (the timesteps actually used)."""
        return {
            "timesteps": [_plain(t) for t in self.timesteps],
            "loss_space": self.loss_space,
            "resolution": self.resolution,
        }


def _plain(t: float) -> float | int:
    t = float(t)
    return int(t) if t.is_integer() else t
