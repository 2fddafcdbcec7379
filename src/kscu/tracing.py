"""Denoiser calls replayed from a recorded graph: the same operations without Python's overhead.

On a CPU a small denoiser spends most of each call in Python (nn.Module dispatch, diffusers' own
code), not in its kernels: the bundled world's UNet takes about 25 ms per batch-of-2 call
through Python and 15 ms replayed. torch's tracer (``torch.jit.trace``'s) records the aten
operations that one call makes; replaying the record runs exactly those operations, in the same
order, on the same kernels, so every value is bit-identical (tested: outputs, gradients, whole
erases). Every record takes the tensors its module holds (buffers) as inputs, read at each
call, and makes each distinct number constant once (``_pool_constants``: most of a record's
bytes were the tracer's constant per scalar argument); a record made without gradients also
drops repeated and shape-only work (``_simplify``). The graph executor's own optimizations
(fusion, its autodiff) are turned off: autograd records the replayed operations as it records
eager ones, so gradients and the per-parameter optimizer hooks are unchanged.

A record holds for one structure of call: the shapes, dtypes and devices of the tensors, every
non-tensor argument, the dtypes of the weights, grad mode and the module's training flag; each
is recorded once, under the caller's grad mode. Every parameter is an input of the graph, never
a constant, so one record serves the edited weights, the frozen originals (``params``) and the
trajectory walk alike. What a record cannot see is taken as fixed while this object lives: the
module's Python attributes (attention processors, submodules, which tensors are its
buffers). Since a record silently keeps whatever Python decided from values (a timestep turned
into a number, a branch on a tensor), the first replay of each record is also run through
Python and compared bit for bit; a record that differs is dropped and its calls run through
Python from then on. (A branch that first flips on a later call would pass that check. With
diffusers 0.42 the tracer's notices of a value read during a record all come from shape checks
for SD's and SDXL's UNets, and shapes are part of the key; FLUX's transformer gives none.)

Used where it is exact and pays: float32 without autocast, on the CPU, without gradient
checkpointing (a record would inline the checkpointed blocks and keep every activation). Calls
that cannot be recorded, and modules with hooks (which a replay would skip), run through Python.
"""

from __future__ import annotations

import math
import struct
import warnings
from typing import Any

import torch
from torch import nn

Spec = tuple  # how to rebuild keyword arguments from their tensors (see _flatten)


def traceable(module: nn.Module, dtype: torch.dtype, checkpointing: bool) -> bool:
    """Where replaying is exact and measured to pay (see the module docstring), unless
    ``PYTORCH_JIT=0`` turned TorchScript off (as ``torch.jit.trace`` would then record nothing)."""
    checkpointing = checkpointing or bool(getattr(module, "is_gradient_checkpointing", False))
    return replays(module.device, dtype, checkpointing)


def replays(device: torch.device, dtype: torch.dtype, checkpointing: bool) -> bool:
    """``traceable`` for a network that will run on ``device`` (``kscu erase --plan``'s view)."""
    on = bool(torch.jit._state._enabled)
    return on and device.type == "cpu" and dtype == torch.float32 and not checkpointing


class _Record:
    """One structure's graph and the tensors it reads besides the call's (``held``, passed at
    each replay); ``checked`` once its first replay matched the eager call."""

    def __init__(self, graph: Any, held: list[torch.Tensor]):
        self.graph, self.held, self.checked = graph, held, False


class TracedDenoiser:
    """One module's calls, each structure recorded once and then replayed.

    ``params`` (name -> tensor) replace some of the module's parameters for one call, as
    ``torch.func.functional_call`` would; the module itself is never modified.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.modules = list(module.modules())
        self.names: list[str] = []  # one per distinct parameter tensor: the graph's weight inputs
        self.slots: list[list[tuple[nn.Module, str]]] = []  # where each one sits (tied: several)
        index: dict[int, int] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            owner, _, attr = name.rpartition(".")
            if id(p) not in index:
                index[id(p)] = len(self.names)
                self.names.append(name)
                self.slots.append([])
            self.slots[index[id(p)]].append((module.get_submodule(owner), attr))
        self.known = frozenset(self.names)
        self.records: dict[tuple, _Record | None] = {}  # structure -> record; None: eager
        self.dropped = 0  # records whose first replay differed from the eager call

    def __call__(self, params: dict[str, torch.Tensor] | None, kwargs: dict[str, Any]) -> Any:
        if _intercepted(self.modules) or (params and not params.keys() <= self.known):
            return _eager(self.module, params, kwargs)
        tensors: list[torch.Tensor] = []
        spec = _flatten(kwargs, tensors)
        weights = [owner._parameters[attr] for (owner, attr), *_ in self.slots]
        if params:  # the given values in place of the module's own, by name
            weights = [params.get(n, w) for n, w in zip(self.names, weights, strict=True)]
        try:
            key = (
                spec,
                tuple((t.shape, t.dtype, t.device) for t in tensors),
                tuple(w.dtype for w in weights),
                self.module.training,
                torch.is_grad_enabled(),
                torch.get_default_dtype(),
            )
            hash(key)
        except TypeError:  # an argument that cannot be part of a key: never recorded
            return _eager(self.module, params, kwargs)
        if key not in self.records:
            self.records[key] = self._record(spec, tensors, weights)
            return _eager(self.module, params, kwargs)
        record = self.records[key]
        if record is None:
            return _eager(self.module, params, kwargs)
        with torch.jit.optimized_execution(False):  # replay as recorded: no fusion, eager autograd
            out = record.graph(*tensors, *weights, *record.held)
        if not record.checked:
            with torch.no_grad():  # values only: the record was made in this grad mode
                expected = _eager(self.module, params, kwargs)
            if not _same(out, expected):
                self.records[key], self.dropped = None, self.dropped + 1
                return _eager(self.module, params, kwargs)
            record.checked = True
        return out

    @property
    def recorded(self) -> int:
        return sum(r is not None for r in self.records.values())

    def summary(self) -> str:
        """What the run record says about its denoiser calls."""
        if not self.recorded:
            return "eager"
        dropped = f", {self.dropped} differed and ran eager" if self.dropped else ""
        return f"replayed ({self.recorded} recorded{dropped})"

    def _record(
        self, spec: Spec, tensors: list[torch.Tensor], weights: list[torch.Tensor]
    ) -> _Record | None:
        """A replayable graph of one call of this structure, or None if it cannot be recorded."""
        count = len(tensors)
        grad = torch.is_grad_enabled()

        def call(*inputs: torch.Tensor) -> Any:
            kwargs = _rebuild(spec, iter(inputs[:count]))
            kept = [[owner._parameters[attr] for owner, attr in slot] for slot in self.slots]
            try:
                for slot, weight in zip(self.slots, inputs[count:], strict=True):
                    for owner, attr in slot:
                        owner._parameters[attr] = weight
                return self.module(**kwargs)
            finally:
                for slot, old in zip(self.slots, kept, strict=True):
                    for (owner, attr), p in zip(slot, old, strict=True):
                        owner._parameters[attr] = p

        # Recorded outside inference mode, on plain copies of the inputs: constants made during
        # the call must be ordinary tensors, usable by a later call that records gradients.
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            examples = [t.clone() for t in tensors] + [w if grad else w.detach() for w in weights]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notices of values it read
                try:
                    return _trace(call, examples, simplify=not grad)
                except Exception:  # noqa: BLE001 - untraceable code runs eager, as before
                    return None


def _trace(call: Any, examples: list[torch.Tensor], simplify: bool) -> _Record:
    """``torch.jit.trace(call, examples, check_trace=False)``, held by the caller alone, with
    its tensor constants made inputs, its other constants made once, ``_simplify`` run where
    asked and its nodes' Python stacks dropped: the same operations, 40% of the bytes.

    ``torch.jit.trace`` registers every function it makes in torch's process-wide compilation
    unit, which keeps it until the process ends: a record outlived its erase or walk, so each
    erase, preview or generation in one process (a bench, a notebook) left its records behind,
    2-4 MiB per 600 operations here. The same tracer's graph goes into a function of its own
    compilation unit instead, freed with its last reference; it runs the same graph.
    """
    lookup = torch.jit._trace._create_interpreter_name_lookup_fn(0)
    graph, _ = torch._C._create_graph_by_tracing(call, examples, lookup, True, False)
    held = _lift_tensor_constants(graph)
    _pool_constants(graph)
    if simplify:
        _simplify(graph)
    _forget_python_stacks(graph)
    return _Record(torch._C._create_function_from_graph("kscu_record", graph), held)


def _forget_python_stacks(graph: Any) -> None:
    """Drop the Python stack and module scope each node keeps from its record (text for error
    messages only; about 30% of a record's bytes: 9.5 MiB instead of 13.3 for the bundled
    world's two, measured); the operations are untouched."""
    blank = graph.create("prim::Constant")  # never inserted: no source range, the root scope
    blocks = [graph]
    while blocks:
        for node in blocks.pop().nodes():
            node.copyMetadata(blank)
            blocks.extend(node.blocks())
    blank.destroy()


def _lift_tensor_constants(graph: Any) -> list[torch.Tensor]:
    """Every tensor the graph holds as a constant becomes an input, given at each call.

    The tracer turns a tensor the module holds outside its parameters (a buffer) into a constant
    that shares its memory. torch's passes merge constants that compare equal: two buffers with
    the same values at record time, one of which a caller changes in place later, would be read
    as one. As inputs they are distinct values that no pass merges or folds, and each call reads
    the tensor itself. A Python number in tensor arithmetic also becomes a 0-dim tensor constant
    (a "wrapped number", which Python sees as the number): it stays a constant, since a new
    tensor would lose its type-promotion rule; equal ones are interchangeable, but for -0.0
    (``_negative_zero``).
    """
    held = []
    for node in graph.findAllNodes("prim::Constant", True):
        value = node.output()
        if isinstance(value.type(), torch._C.TensorType) and isinstance(
            tensor := value.toIValue(), torch.Tensor
        ):
            held.append(tensor)
            lifted = graph.addInput()
            lifted.setType(value.type())
            value.replaceAllUsesWith(lifted)
            node.destroy()
    return held


def _simplify(graph: Any) -> None:
    """Remove a no-gradient record's repeated and constant work; each value stays the same.

    The record holds for fixed input shapes (they are in its key), so shape arithmetic folds to
    constants (peephole; constant propagation of numbers only: no tensor is computed ahead, so a
    tensor the module holds outside its parameters is read at each call, as through Python);
    the same pure operation on the same inputs is made once (common subexpressions: for example
    the time embedding's SiLU, which every ResNet block applies again); what no output needs
    goes. Every remaining operation runs on the same inputs and kernels as before. Not for
    records with gradients: there, one operation instead of several would sum its gradients in
    another order.
    """
    if not _negative_zero(graph):  # torch's passes take -0.0 for 0.0 (equal as numbers)
        torch._C._jit_pass_peephole(graph)
        torch._C._jit_pass_constant_propagation_immutable_types(graph)
        torch._C._jit_pass_cse(graph)
    torch._C._jit_pass_dce(graph)


POOLED_TYPES = ("int", "float", "bool", "NoneType", "str", "Device")


def _pool_constants(graph: Any) -> None:
    """Make each distinct number, flag, string or device constant once; no operation changes.

    The tracer gives every scalar argument its own constant node (1,714 of the bundled world's
    2,981 nodes in its record with gradients), each keeping a copy of the Python stack it was
    made under: pooled, that record holds 8.1 MiB instead of 17.4 after its first replay.
    Constants are equal only bit for bit (a float by its 8 bytes: 0.0 and -0.0 stay apart, as
    torch's own pooling does not keep them) and carry no gradient; every operation, its inputs
    and their order, and so every gradient's summation order, stay the same. Constants inside
    nested blocks (none in a traced call) are left alone.
    """
    first: dict[tuple, Any] = {}
    for node in list(graph.nodes()):
        if node.kind() != "prim::Constant" or str(node.output().type()) not in POOLED_TYPES:
            continue
        key = _constant_key(node.output())
        if key in first:
            node.output().replaceAllUsesWith(first[key])
            node.destroy()
        else:
            first[key] = node.output()


def _constant_key(value: Any) -> tuple:
    number = value.toIValue()
    exact = struct.pack("<d", number) if isinstance(number, float) else repr(number)
    return str(value.type()), exact


def _negative_zero(graph: Any) -> bool:
    """A constant -0.0 in the graph, a float or a wrapped number (rare: a literal ``-0.0``)."""
    return any(
        isinstance(v := node.output().toIValue(), float) and v == 0 and math.copysign(1, v) < 0
        for node in graph.findAllNodes("prim::Constant", True)
    )


def _same(a: Any, b: Any) -> bool:
    """Bit-identical outputs of the same structure (``torch.equal`` takes -0.0 for 0.0: the
    signs are compared too)."""
    left: list[torch.Tensor] = []
    right: list[torch.Tensor] = []
    if _flatten(a, left) != _flatten(b, right):
        return False
    return all(
        torch.equal(x, y) and (not x.is_floating_point() or torch.equal(x.signbit(), y.signbit()))
        for x, y in zip(left, right, strict=True)
    )


def _intercepted(modules: list[nn.Module]) -> bool:
    """Code that runs around a module's forward, which a replay would skip: then run eager.

    Hooks run in ``nn.Module.__call__``; accelerate's and diffusers' hooks replace ``forward``;
    ``Module.compile``, torch-function modes and autocast change how the call runs. Checked on
    every call (they may come and go), over the submodules the module had when this object was
    made.
    """
    from torch.nn.modules import module as torch_module

    global_hooks = (
        torch_module._global_forward_hooks,
        torch_module._global_forward_pre_hooks,
        torch_module._global_backward_hooks,
        torch_module._global_backward_pre_hooks,
    )
    if any(global_hooks) or torch._C._is_torch_function_mode_enabled():
        return True
    if any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
        return True  # a record would keep the casts of its first call
    return any(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or getattr(m, "_compiled_call_impl", None) is not None
        or "forward" in m.__dict__
        or "_hf_hook" in m.__dict__
        or "_diffusers_hook" in m.__dict__
        for m in modules
    )


def _eager(module: nn.Module, params: dict[str, torch.Tensor] | None, kwargs: dict) -> Any:
    from kscu.families.base import call_module

    return call_module(module, params, **kwargs)


def _flatten(value: Any, tensors: list[torch.Tensor]) -> Spec:
    """A hashable description of ``value`` with its tensors appended to ``tensors`` in order."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("tensor",)
    if isinstance(value, dict):
        return ("dict", tuple((k, _flatten(v, tensors)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_flatten(v, tensors) for v in value))
    return ("value", type(value).__name__, value)  # 3 and 3.0 hash alike, may trace apart


def _rebuild(spec: Spec, tensors) -> Any:
    kind = spec[0]
    if kind == "tensor":
        return next(tensors)
    if kind == "dict":
        return {k: _rebuild(s, tensors) for k, s in spec[1]}
    if kind in ("list", "tuple"):
        items = [_rebuild(s, tensors) for s in spec[1]]
        return items if kind == "list" else tuple(items)
    return spec[2]
