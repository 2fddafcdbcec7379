"""Memory of an erase: the plan before it (``kscu erase --plan``) and the peak measured during it.

The plan counts every byte the erase holds, by component, from the model's configs alone (the
networks are built on the meta device: no weights are read):

- weights: the denoiser as loaded (the checkpoint's dtype, or float32 where an exact upcast is
  needed), the text encoders and the VAE in the compute dtype;
- masters: float32 copies of the trainable tensors (none extra when the denoiser is float32);
- frozen: the original trainable tensors in the compute dtype (the frozen model's weights). A
  checkpoint stored in the compute dtype (FLUX.1's bf16) is its own frozen copy: its tensors,
  counted in weights, stay as loaded and the masters are new float32 tensors (4 bytes each);
- adam: Adam's two float32 moments per trainable element (``--lean-adam``: two bf16 moments,
  plus the float32 temporaries of the one tensor being stepped);
  ``--offload-adam``: the exact moments in host memory (``host_bytes``), and on the device the
  moments of the one tensor being stepped;
- gradients: float32; with optimizer-in-backward only the largest trainable tensor's at a time,
  plus the small tensors' that are stepped together after the backward;
- activations: the peak of the bytes alive while the edited forward and its backward run, at
  the training resolution, with the erase's own trainable tensors (measured by running both on
  the meta device, attention as the fused kernels save it): what autograd saves for those
  tensors' gradients, each buffer once, and the backward's working memory. Under
  ``--gradient-checkpointing`` the trace goes through diffusers' own checkpointed calls: each
  call's inputs stay, its inside lives only while backward recomputes it. The trace has the
  real erase's dtypes, so under bf16/fp16 compute it also counts autocast's compute-dtype
  copies of float32 weights (the masters, and a float32 checkpoint's other weights) that
  backward needs;
- replay_records: where the denoiser's calls are replayed (``kscu.tracing``: a CPU, float32),
  the two recorded graphs, host memory that grows with the network's operations, not with its
  weights: computed as ``RECORD_BYTES_PER_OPERATION`` per operation of the activations' trace
  (torch's tracer cannot run on meta tensors);
- restore copy: with a lossy compute dtype (bf16 of a float32 checkpoint) the trainer keeps an
  exact float32 copy of the trainable tensors in host memory, to undo a failed erase; counted in
  the total only when the erase runs on the CPU (on a GPU it is host RAM, reported apart in
  ``host_bytes``, as are the text encoders and the VAE, which every family moves off the
  accelerator once the prompts are encoded).

The measured peak is CUDA's max allocated memory on a GPU, and on a CPU the growth of the
process's peak resident set (``VmHWM``, reset at the start through ``/proc/self/clear_refs``),
from a start read once glibc's free heap blocks went back to the system.
"""

from __future__ import annotations

import contextlib
import functools
import re
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from kscu.allocator import glibc, proc_bytes
from kscu.config import EraseConfig
from kscu.errors import KscuError
from kscu.models import TORCH_DTYPES, check_networks, resolve_device, stored_dtype
from kscu.optim import steps_together
from kscu.scope import trainable_names
from kscu.tracing import replays

GRAD_DTYPE_BYTES = 4
# Host bytes the erase's two replay records (kscu.tracing: CPU, float32) hold together, per
# operation the plan's meta trace of the edited forward and backward runs: measured (glibc's
# heap bytes in use, each record replayed once: benchmarks/record_bytes.py --per-operation) on
# torch 2.13 at 4,829 for the bundled world (9.55 MiB, 2,074 operations) and 4,711 for SD
# v1.4's UNet (20.11 MiB, 4,475 operations); 5,583 for the tests' tiny FLUX transformer (3.84 MiB,
# 722 operations). Torch's tracer cannot run on meta tensors, and tracing real weights would
# cost the plan SD v1.4's 3.4 GB and 90 s, so it counts operations.
RECORD_BYTES_PER_OPERATION = 4_770


def _bytes(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _meta_component(source: str, name: str, cls_name: str, library: str) -> torch.nn.Module:
    """A pipeline component built from its config on the meta device (no weights read)."""
    import importlib

    module = importlib.import_module(library)
    cls = getattr(module, cls_name)
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(cls.load_config(source, subfolder=name))
        from transformers import AutoConfig

        return cls(AutoConfig.from_pretrained(source, subfolder=name, trust_remote_code=False))


def _components(source: str, family: Any) -> dict[str, torch.nn.Module]:
    """The networks of the pipeline at ``source`` (denoiser, text encoders, VAE), on meta."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(source)
    out = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list | tuple) or None in spec:
            continue
        library, cls_name = spec
        if library in ("diffusers", "transformers") and re.search(
            "Model|Transformer|UNet|Autoencoder", cls_name
        ):
            out[name] = _meta_component(source, name, cls_name, library)
    check_networks(source, family, out)
    return out


def activation_bytes(
    family: Any,
    pipe_like: Any,
    cfg: EraseConfig,
    compute: torch.dtype,
    float32: set[str],
    trainable: set[str],
) -> tuple[int, int]:
    """Peak bytes one edited forward (2 rows: e and u; ESD: 1) and its backward hold, and the
    number of operations they ran (``replay_records`` follow it).

    The forward and its backward run on the meta device with the erase's own trainable tensors,
    and the count is the peak of the bytes alive (``_LiveBytes``): what autograd saves for those
    tensors' gradients (not the inputs frozen layers would need for their own weight gradients),
    and the backward's working memory (activation gradients, attention's backward buffers).
    Each trainable tensor's gradient is dropped once complete, as optimizer-in-backward does
    (``gradients`` counts them). With ``--gradient-checkpointing`` the network runs through
    diffusers' own checkpointed calls (torch's non-reentrant checkpoint), so each call's inputs
    stay and its inside lives only while backward recomputes it (the CPU random state torch's
    checkpoint keeps per call, 5 KB made outside the dispatcher, is not counted).

    The trace has the dtypes of a real erase: weights not named in ``float32`` (the masters and
    a float32 checkpoint's weights) are in the compute dtype, and since the meta device has no
    autocast, ``_MetaTrace`` casts the inputs of the ops autocast runs in the compute dtype, in
    the forward and in each recomputation alike. So the compute-dtype copies of float32 weights
    that backward needs are counted, and so are the float32 tensors that norms and rotary
    embeddings compute in float32.
    """
    net = family.denoiser(pipe_like)
    for name, p in net.named_parameters():
        if name not in float32:
            p.data = p.data.to(compute)  # on the meta device: no memory
        p.requires_grad_(name in trainable)
    if cfg.gradient_checkpointing:
        net.enable_gradient_checkpointing(functools.partial(_traced_checkpoint, compute))
    sampler = family.sampler(pipe_like, cfg.num_steps, cfg.resolution, cfg.loss_space)
    rows = 1 if cfg.lambda2 == 0 else 2
    x = sampler.noise(0).expand(rows, *sampler.noise(0).shape[1:])
    cond = family.meta_cond(pipe_like, rows, cfg.max_sequence_length)
    edited = functools.partial(sampler.raw, net, x, cfg.start_step, cond)
    return _forward_backward_peak(net, edited, compute, [x, *cond.values()])


def _traced_checkpoint(compute: torch.dtype, call: Callable, *args: Any) -> Any:
    """torch's non-reentrant checkpoint of ``call``, as diffusers' default, with ``_MetaTrace``
    entered for the recomputation: it runs inside backward, where the trace's mode is not
    active (the forward already runs inside it)."""

    def contexts() -> tuple[Any, Any]:  # (the forward's, the recomputation's)
        return contextlib.nullcontext(), _MetaTrace(compute)

    return checkpoint(call, *args, use_reentrant=False, context_fn=contexts)


def _forward_backward_peak(
    net: torch.nn.Module,
    forward: Callable[[], torch.Tensor],
    compute: torch.dtype,
    inputs: list[torch.Tensor],
) -> tuple[int, int]:
    """Peak bytes alive while ``forward()`` and its backward run, the network's own tensors and
    the inputs apart (each counted elsewhere), and the number of operations both ran. Changes
    ``net``: pass a throwaway meta network."""
    for p in net.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_drop_grad)
    there = [*net.parameters(), *net.buffers(), *inputs]
    live = _LiveBytes({t.untyped_storage()._cdata for t in there})
    with live:
        with _MetaTrace(compute):
            out = forward()
        out.float().square().mean().backward()  # a float32 gradient of the output, as the loss's
    return live.peak, live.operations


def _drop_grad(p: torch.Tensor) -> None:
    """As optimizer-in-backward frees each gradient after its step (``gradients`` counts them;
    the trace may hold one of them at its peak too, at most the largest: 36 MiB for FLUX)."""
    p.grad = None


class _LiveBytes(TorchDispatchMode):
    """The peak of the bytes alive among the tensors the ops inside produce.

    Each new storage is counted once (views share it), at its size when first seen, until it is
    freed (a storage grown later by ``out=`` or ``resize_`` is not re-read: no such op in these
    traces). torch keeps a storage's Python object while the storage lives, so a finalizer on it
    runs when the memory would be released. Works on the meta device, where storages have sizes
    but no memory.
    """

    def __init__(self, skip: set[int]):
        super().__init__()
        self.skip, self.alive, self.live, self.peak = skip, {}, 0, 0
        self.operations = 0  # dispatched: what a replay record's size follows

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operations += 1
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.skip and key not in self.alive:
                    self.alive[key] = storage.nbytes()
                    self.live += self.alive[key]
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self.alive.pop(key, 0)


class _MetaTrace(torch.overrides.TorchFunctionMode):
    """What the meta device lacks for a faithful trace: autocast and the fused attention kernels.

    Autocast's casting rule: the ops autocast runs in a lower precision (matmuls, convolutions,
    attention) get float32 inputs cast to ``dtype``; every other op follows its inputs' dtypes,
    as under autocast. Attention: on meta tensors ``scaled_dot_product_attention`` decomposes
    into the math path, which saves the whole attention matrix (1 GiB per SD v1.4 attention call
    at 512 px); the kernels a real erase runs (flash on the CPU, flash or memory-efficient on
    CUDA) save only the inputs, the output and a log-sum-exp per row, as the CPU flash kernel's
    meta form does.
    """

    LOWER = {
        F.linear,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.scaled_dot_product_attention,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.mm,
        torch.bmm,
        torch.addmm,
        torch.baddbmm,
    }
    SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.dtype != torch.float32 and func in self.LOWER:
            args = tuple(self._cast(a) for a in args)
            kwargs = {k: self._cast(v) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            a = dict(zip(self.SDPA_ARGS, args, strict=False)) | kwargs
            plain = a.get("attn_mask") is None and not a.get("dropout_p")
            if plain and not a.get("enable_gqa") and a["query"].device.type == "meta":
                flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
                q, k, v = a["query"], a["key"], a["value"]
                return flash(q, k, v, 0.0, a.get("is_causal", False), scale=a.get("scale"))[0]
        return func(*args, **kwargs)

    def _cast(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            return value.to(self.dtype)
        return value


class _MetaPipe:
    """What a family's sampler reads from a pipeline, for networks built on the meta device."""

    def __init__(self, components: dict[str, torch.nn.Module], scheduler_config: dict):
        from types import SimpleNamespace

        self.__dict__.update(components)
        self.components = components  # by name, as a diffusers pipeline's ``components``
        self.scheduler = SimpleNamespace(config=scheduler_config)
        vae = components["vae"]
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.device = torch.device("meta")


def _adam_bytes(cfg: EraseConfig, trainable: int, largest: int) -> int:
    """Adam's state on the erase's device."""
    if cfg.lean_adam:  # bf16 moments, widened to float32 for one tensor's step: six float32
        return trainable * 4 + largest * 24  # temporaries (moments, denominator, noise, bits)
    if cfg.offload_adam:  # the moments live in host RAM; one tensor's visit for its step
        return largest * 8
    return trainable * 8


def _gradient_elements(cfg: EraseConfig, sizes: list[int]) -> int:
    """Gradient elements alive at once: all, or (optimizer-in-backward) the largest tensor's
    plus the small tensors' that wait for the end of the backward (kscu.optim)."""
    if not cfg.optimizer_in_backward or cfg.dtype == "float16":
        return sum(sizes)
    waits = [steps_together(n, cfg.lean_adam, cfg.offload_adam) for n in sizes]
    alone = max((n for n, w in zip(sizes, waits, strict=True) if not w), default=0)
    return alone + sum(n for n, w in zip(sizes, waits, strict=True) if w)


def meta_pipeline(source: str, family: Any) -> _MetaPipe:
    """The pipeline at ``source`` (a folder or hub id) as its configs describe it: its networks
    on the meta device and its scheduler's config; what a family's sampler reads."""
    import diffusers
    from diffusers import DiffusionPipeline

    scheduler_class = getattr(diffusers, DiffusionPipeline.load_config(source)["scheduler"][1])
    scheduler = scheduler_class.load_config(source, subfolder="scheduler")
    return _MetaPipe(_components(source, family), scheduler)


def check_sampler(
    model: str | None, family: Any, steps: int, resolution: int | None, guidance: Any = None
) -> None:
    """Refuse steps or a resolution the family's sampler refuses before the model loads
    (minutes for SD or FLUX), not after: the sampler is built as ``--plan`` builds it, on the
    model's configs with its networks on the meta device, no weights read. Configs that cannot
    be read here (a hub id offline) leave the verdict to the sampler built after loading, which
    checks the same: an early check must not refuse what loading allows."""
    from kscu.models import default_model

    model = default_model() if model is None else str(model)
    path = Path(model).expanduser()
    try:
        pipe_like = meta_pipeline(str(path) if path.exists() else model, family)
        family.sampler(pipe_like, steps, resolution, guidance=guidance)
    except KscuError:  # the steps or the size, or a pipeline without its networks
        raise
    except Exception:  # noqa: BLE001 - not knowable without loading: checked again then
        return


def plan(model: str, cfg: EraseConfig, family: Any) -> dict[str, Any]:
    """Expected bytes by component for ``cfg`` on ``model`` (a folder or hub id)."""
    source = str(Path(model).expanduser()) if Path(model).expanduser().exists() else model
    pipe_like = meta_pipeline(source, family)
    components = pipe_like.components
    compute = TORCH_DTYPES[cfg.dtype]
    net = family.denoiser(pipe_like)
    loaded = stored_dtype(source, family)
    loaded = loaded if loaded == compute else torch.float32
    names = trainable_names(net, cfg.scope, family)
    params = dict(net.named_parameters())
    trainable = sum(params[n].numel() for n in names)
    largest = max(params[n].numel() for n in names)
    others = sum(
        p.numel()
        for name, m in components.items()
        if name != family.denoiser_attr
        for p in m.parameters()
    )
    device = resolve_device() if cfg.device == "auto" else torch.device(cfg.device)
    on_cpu = device.type == "cpu"
    host = {  # what the erase keeps in host RAM, off the accelerator, at its peak
        "encoders": 0 if on_cpu else others * _bytes(compute),  # family.encoder_modules
        "restore_copy": trainable * 4 if loaded != compute else 0,
    }
    if cfg.offload_adam:
        host["adam_state"] = trainable * 8  # the exact moments, stepped on the device per tensor
    parts = {
        "weights": sum(p.numel() for p in net.parameters()) * _bytes(loaded)
        + others * _bytes(compute)
        - host["encoders"],
        # loaded in float32: those tensors are the masters, the frozen copy is made; else the
        # loaded tensors are the frozen copy (kscu.trainer._frozen), the masters new tensors
        "masters": 0 if loaded == torch.float32 else trainable * 4,
        "frozen": trainable * _bytes(compute) if loaded == torch.float32 else 0,
        "adam": _adam_bytes(cfg, trainable, largest),
        "gradients": _gradient_elements(cfg, [params[n].numel() for n in names]) * GRAD_DTYPE_BYTES,
    }
    float32_weights = set(names) | (set(params) if loaded == torch.float32 else set())
    parts["activations"], operations = activation_bytes(
        family, pipe_like, cfg, compute, float32_weights, set(names)
    )
    replayed = cfg.trace_denoiser and replays(device, compute, cfg.gradient_checkpointing)
    if replayed:
        parts["replay_records"] = operations * RECORD_BYTES_PER_OPERATION
    if on_cpu:  # host RAM is the erase's own memory
        parts["restore_copy"] = host.pop("restore_copy")
        if cfg.offload_adam:
            parts["adam_state"] = host.pop("adam_state")
    return {
        "trainable_elements": trainable,
        "bytes": parts,
        "total_bytes": sum(parts.values()),
        "host_bytes": host,
        "assumptions": _uncounted(cfg, device, replayed),
    }


def _uncounted(cfg: EraseConfig, device: torch.device, replayed: bool) -> str:
    """What the plan leaves out; printed by ``kscu erase --plan`` beside the figures."""
    left = ["the erase's own buffers (latents, embeddings)", "allocator overhead"]
    if cfg.gradient_checkpointing:
        left.append("the CPU random state torch keeps per checkpointed call (5 KB each)")
    if device.type == "cpu":
        left.append("library code and caches torch sets up on first use")
    counted = "networks as configured"
    if replayed:
        counted += (
            "; replay_records (the graphs of the replayed denoiser calls, kscu.tracing) computed "
            f"at {RECORD_BYTES_PER_OPERATION / 1000:g} kB per operation of one forward and backward"
        )
    return counted + "; not counted: " + "; ".join(left)


@contextlib.contextmanager
def peak_memory(
    device: torch.device, since: dict[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Yields a dict filled at exit: ``{"bytes": peak, "kind": what was measured}``; on a CPU
    also ``"file_bytes"``, the growth of the file-backed resident set over the same span, read
    at the end, part of ``bytes`` (library code first run inside, and pages of weights mapped
    from their file first read inside); ``"start"``, what the growth is counted from; and
    ``"first_use"``, what ``pay_first_use`` did before it (None: not asked).

    On a CPU the growth is counted from ``since`` (``cpu_start``: ``kscu erase`` reads it before
    its model loads, so the weights are in the growth, as the plan counts them and as CUDA's max
    allocated counts them; for a pipeline passed in loaded, before anything the run does with
    it, a preview included), else from here. The peak is the span's: blocks freed before it go
    back to the system first and the peak resident set is reset here.
    """
    record: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield record
        record.update(
            bytes=torch.cuda.max_memory_allocated(device),
            kind="cuda_max_allocated",
            start_bytes=start,
            start=START_CUDA,
        )
        return
    if since is None:
        begin = resident(START_AFTER_LOAD)  # once freed blocks went back to the system
    else:  # blocks freed since ``since`` (a preview's) go back to the system
        _return_free_heap()
        begin = since
    record["first_use"] = begin.get("first_use")
    reset = _reset_peak_rss()
    yield record
    peak = proc_bytes("status", "VmHWM")
    if reset and peak is not None and begin["rss"] is not None:
        record.update(
            bytes=peak - begin["rss"],
            kind="cpu_peak_rss_growth",
            start_bytes=begin["rss"],
            start=begin["start"],
        )
        end_files = proc_bytes("status", "RssFile")
        if begin["files"] is not None and end_files is not None:
            record["file_bytes"] = end_files - begin["files"]
    else:
        record.update(bytes=None, kind="unavailable (no /proc/self/clear_refs)")


START_CUDA = "absolute: every tensor allocated on the device, the weights included"
START_BEFORE_LOAD = "growth from before the model loaded: the weights included"
START_AFTER_LOAD = (
    "growth from after the pipeline was loaded (passed in): its weights excluded, but for pages "
    "of weights mapped from their file that the erase reads first"
)


def planned_bytes(plan: dict[str, Any], start: str | None) -> int | None:
    """The plan's figure for what ``peak_memory`` measured from ``start``: the total, or without
    the weights where they were resident before the growth was counted."""
    if "total_bytes" not in plan or start is None:
        return None
    weights = plan["bytes"]["weights"] if start == START_AFTER_LOAD else 0
    return plan["total_bytes"] - weights


def resident(start: str) -> dict[str, Any]:
    """The resident set now (all, and file-backed), as the start of a CPU measurement of
    ``start`` (what it counts from), once freed heap blocks went back to the system."""
    _return_free_heap()
    rss, files = proc_bytes("status", "VmRSS"), proc_bytes("status", "RssFile")
    return {"rss": rss, "files": files, "start": start}


def cpu_start(start: str, cfg: EraseConfig | None = None) -> dict[str, Any]:
    """``resident(start)`` once the process paid its first use of the libraries
    (``pay_first_use``; what it did goes into the record as ``first_use``)."""
    paid = pay_first_use(cfg)
    return {**resident(start), "first_use": paid}


# what pay_first_use did in this process: None until it ran, then its record
_FIRST_USE: dict[str, str | None] = {"state": None}
FIRST_USE_PAID = (
    "paid before the measurement: a 2-iteration erase of the bundled world with this erase's "
    "engine settings and a 2-step sample of its preview (kscu.memory.pay_first_use)"
)


def pay_first_use(cfg: EraseConfig | None = None) -> str:
    """Before a process's first CPU measurement: a 2-iteration erase of the bundled world and a
    2-step sample of its preview.

    The first erase in a process also pays what torch and its libraries set up on first use and
    never free (the tracer's and the autograd engine's state, oneDNN's, library code first run:
    30-35 MiB measured on the world, more than the world erase's own non-weight bytes), which no
    later erase in the process pays and the plan does not count (it counts tensors, as CUDA's
    max allocated does). Paid here, outside the measured span, with ``cfg``'s engine settings
    (``EraseConfig.engine``), the growth holds much less of it; what another family's own modules
    and first load set up still lands in the span (a few MiB against its GiBs). The preview
    ``kscu erase`` samples before its erase, inside the span, pays such state for its own batch
    shapes (10.2 MiB resident after the world's first preview, 0.7 after its second, measured):
    the world's preview is sampled here too, at the world's own resolution (another model's or
    resolution's preview shapes are not paid: a few MiB against its GiBs).

    It runs on its own pipeline and changes no result; it leaves the process as any CPU erase
    does (glibc's settings after an erase, kscu.allocator.AFTER) and the libraries' progress
    bars as it found them. Any failure (no bundled world, an engine setting the world cannot
    run) skips it and says so in the record; it runs once per process: 1.6-1.7 s on 2 cores
    once the libraries have loaded a pipeline (0.65 s of it the preview sample), measured.
    """
    if _FIRST_USE["state"] is None:
        _FIRST_USE["state"] = _pay_first_use(cfg)
    return _FIRST_USE["state"]


def _pay_first_use(cfg: EraseConfig | None) -> str:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from kscu import preview
    from kscu.models import default_model, load_pipeline
    from kscu.trainer import erase

    engine = cfg.engine() if cfg is not None else {}
    short = EraseConfig(
        concepts=["circle"], iterations=2, num_steps=6, start_step=2, device="cpu", **engine
    )
    bars = [m.is_progress_bar_enabled() for m in (diffusers_logging, transformers_logging)]
    try:  # whatever the caller's grad mode (a notebook's inference_mode): an erase needs grad
        with torch.inference_mode(False), torch.enable_grad():
            world = load_pipeline(default_model(), short.dtype, "cpu", exact_denoiser=True)
            erase(world, short, progress=False)
            try:
                preview.sample(world, preview.world_prompts("circle"), 0, steps=2)
            except Exception as e:  # noqa: BLE001 - the erase's part was paid all the same
                return f"{FIRST_USE_PAID}; its preview sample not ({_why(e)})"
    except Exception as e:  # an aid to the measurement must never cost the user's erase
        return f"not paid ({_why(e)})"
    finally:
        for module, on in zip((diffusers_logging, transformers_logging), bars, strict=True):
            if on:
                module.enable_progress_bar()
            else:
                module.disable_progress_bar()
    return FIRST_USE_PAID


def _why(e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def _return_free_heap() -> None:
    """Give the heap's free blocks back to the system before the start is read.

    Blocks freed before the erase (a preview's activations and replay records) stay resident in
    glibc's heap; the erase would reuse them without the resident set growing, so its growth
    would hide that many of its own bytes (13.6 MiB of the bundled world's 59.9 MiB, measured).
    """
    import gc

    gc.collect()  # tensors in reference cycles (autograd graphs) free their storage now
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
