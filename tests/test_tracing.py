import copy
import functools
import gc
import weakref
from collections import Counter
from dataclasses import replace

import pytest
import torch
from tiny import build_tiny_pipeline
from tiny_families import build_tiny_flux_pipeline, build_tiny_sdxl_pipeline

from kscu import tracing
from kscu.config import EraseConfig, resolve
from kscu.families import family_of
from kscu.tracing import TracedDenoiser, traceable
from kscu.trainer import erase

BUILDERS = {
    "sd": build_tiny_pipeline,
    "sdxl": build_tiny_sdxl_pipeline,
    "flux": build_tiny_flux_pipeline,
}
SETTINGS = {"sd": {}, "sdxl": dict(resolution=32), "flux": dict(resolution=32)}


@functools.cache
def _template(variant):
    return BUILDERS[variant]()


@pytest.fixture(params=sorted(BUILDERS))
def family_pipe(request):
    return request.param, copy.deepcopy(_template(request.param))


def _calls(pipe, variant):
    """raw(s, params, replay) of the family's own sampler, on fixed rows and prompts."""
    family = family_of(pipe)
    net = family.denoiser(pipe).eval()
    sampler = family.sampler(pipe, 6, SETTINGS[variant].get("resolution"))
    cond = family.encode(pipe, ["a church", "a cat"], 16 if variant == "flux" else None)
    x = torch.cat([sampler.noise(1), sampler.noise(2)])
    traced = TracedDenoiser(net)

    def raw(s, params=None, replay=True):
        sampler.traced = traced if replay else None
        return sampler.raw(net, x, s, cond, params=params)

    return net, traced, raw


def _no_python_calls(monkeypatch):
    """From here on a traced call that falls back to Python fails the test."""

    def refuse(*_, **__):
        raise AssertionError("the call ran through Python, not from its record")

    monkeypatch.setattr(tracing, "_eager", refuse)


def test_replay_is_the_eager_call_bit_for_bit(family_pipe, monkeypatch):
    """Every family's denoiser gives the same bits replayed as called through Python, at other
    steps than the recorded one and with other weights (``params``, the frozen originals): the
    timestep and the weights are inputs of the record, not constants. One record serves all."""
    variant, pipe = family_pipe
    net, traced, raw = _calls(pipe, variant)
    others = {n: p.detach() * 1.01 for n, p in list(net.named_parameters())[::3]}
    with torch.inference_mode():
        raw(0), raw(1)  # recorded, then its first replay checked against Python
        _no_python_calls(monkeypatch)
        for s, params in ((0, None), (4, None), (2, others)):
            assert torch.equal(raw(s, params), raw(s, params, replay=False))
        assert not torch.equal(raw(2, others), raw(2))  # the other weights were used
    assert traced.recorded == 1 and traced.summary() == "replayed (1 recorded)"
    assert all(type(p) is torch.nn.Parameter for p in net.parameters())  # the module untouched


def test_replayed_gradients_and_hooks_are_eager_ones(tiny_pipe, monkeypatch):
    """With autograd on, a replay records the same operations: bit-identical gradients, each
    parameter's post-accumulate hook (how kscu.optim steps) fired once per backward. Calls with
    gradients have their own record, made with gradients on."""
    net, traced, raw = _calls(tiny_pipe, "sd")
    net.requires_grad_(False)
    trained = [p for n, p in net.named_parameters() if "attn1" in n or "conv_in" in n]
    fired = []
    for p in trained:
        p.requires_grad_(True)
        p.register_post_accumulate_grad_hook(lambda q: fired.append(q))
    raw(0), raw(1)  # recorded, then checked
    _no_python_calls(monkeypatch)
    grads = {}
    for replay in (True, False):
        raw(3, replay=replay).square().mean().backward()
        grads[replay] = [p.grad.clone() for p in trained]
        for p in trained:
            p.grad = None
    with torch.inference_mode():
        monkeypatch.undo()
        raw(3)  # no gradients: another record
    assert traced.recorded == 2
    assert len(fired) == 2 * len(trained)
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False], strict=True))
    assert any(g.abs().sum() > 0 for g in grads[True])


def test_every_familys_replayed_gradients_are_eager_ones(family_pipe, monkeypatch):
    """SD's, SDXL's and FLUX's records with gradients (their constants pooled) give the eager
    call's gradients bit for bit, for every parameter."""
    variant, pipe = family_pipe
    net, traced, raw = _calls(pipe, variant)
    net.requires_grad_(True)
    raw(0), raw(1)  # recorded, then checked
    grads = {}
    for replay in (True, False):
        if replay:
            _no_python_calls(monkeypatch)
        raw(3, replay=replay).square().mean().backward()
        monkeypatch.undo()
        grads[replay] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        net.zero_grad(set_to_none=True)
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    assert all(torch.equal(grads[True][n], grads[False][n]) for n in grads[True])
    assert traced.recorded == 1


def test_records_without_gradients_drop_repeated_and_shape_work(tiny_pipe):
    """A record made without gradients has its shape arithmetic folded and each repeated pure
    operation made once (the time embedding's SiLU, which every ResNet block applies); one made
    with gradients keeps every operation, so its gradients sum in the eager order. Both replay
    bit for bit (test above and the gradients test)."""
    net, traced, raw = _calls(tiny_pipe, "sd")
    with torch.inference_mode():
        raw(0)
    raw(0)
    kinds = {
        key[4]: Counter(node.kind() for node in record.graph.graph.nodes())
        for key, record in traced.records.items()
    }
    assert kinds[False]["aten::size"] == 0 < kinds[True]["aten::size"]
    assert 0 < kinds[False]["aten::silu"] < kinds[True]["aten::silu"]


def test_a_record_with_gradients_holds_each_constant_once(tiny_pipe):
    """The tracer makes a constant node per scalar argument; a record with gradients keeps one
    of each, and no node keeps its Python stack (its operations stay as recorded: the gradient
    tests replay bit for bit)."""
    net, traced, raw = _calls(tiny_pipe, "sd")
    raw(0)
    (record,) = traced.records.values()
    constants = [n.output() for n in record.graph.graph.nodes() if n.kind() == "prim::Constant"]
    values = [(str(v.type()), repr(v.toIValue())) for v in constants]
    immutable = [v for v, c in zip(values, constants, strict=True) if "Tensor" not in v[0]]
    assert len(immutable) > 10 and len(set(immutable)) == len(immutable)
    # nor the Python stack the tracer kept per node (text for error messages only)
    assert {n.sourceRange() for n in record.graph.graph.nodes()} == {""}


class _HoldsATensor(torch.nn.Module):
    """A tensor outside the parameters (a buffer) that the caller may change in place."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x):
        return (x * self.weight + self.scale * 3,)


def test_a_record_without_gradients_reads_held_tensors_at_each_call():
    """Simplifying a record computes no tensor ahead of the call: a buffer changed in place
    after the record was made is read by the next replay, as Python reads it."""
    module = _HoldsATensor()
    traced = TracedDenoiser(module)
    x = torch.tensor([0.5, 1.0, 2.0])
    with torch.inference_mode():
        traced(None, {"x": x}), traced(None, {"x": x})  # recorded, then checked
        module.scale.add_(1)
        assert torch.equal(traced(None, {"x": x})[0], module(x)[0])
    assert traced.recorded == 1 and traced.dropped == 0


class _EqualAtFirst(torch.nn.Module):
    """Two buffers equal when recorded, and the numbers 0.0 and -0.0: equal as values, not as
    what they compute (torch's constant passes merge both pairs)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.register_buffer("a", torch.full((2,), 3.0))
        self.register_buffer("b", torch.full((2,), 3.0))

    def forward(self, x):
        y = x * self.weight
        return (y * -0.0, y * 0.0, self.a + 2 * self.b)


@pytest.mark.parametrize("grad", [False, True])
def test_a_record_keeps_apart_what_is_equal_only_when_recorded(grad, monkeypatch):
    """Every record, with gradients or without: a buffer changed in place after recording is
    read as itself, not as another that was equal then; -0.0 and 0.0 give their own signs."""
    module = _EqualAtFirst()
    traced = TracedDenoiser(module)
    x = torch.tensor([1.0, -1.0])
    with torch.set_grad_enabled(grad):
        traced(None, {"x": x}), traced(None, {"x": x})  # recorded, then checked
        module.b.mul_(10)
        expected = module(x)
        _no_python_calls(monkeypatch)
        out = traced(None, {"x": x})
    assert traced.recorded == 1 and traced.dropped == 0
    for a, b in zip(out, expected, strict=True):
        assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit()), (a, b)


def test_a_record_is_checked_bit_for_bit():
    """The first replay's check sees the sign of a zero (torch.equal takes -0.0 for 0.0)."""
    zero = torch.zeros(3)
    assert tracing._same((zero,), (zero,)) and not tracing._same((zero,), (-zero,))


def test_records_leave_with_their_owner():
    """torch.jit.trace keeps every function it makes in torch's process-wide compilation unit
    until the process ends; a record must go when its TracedDenoiser does, or each erase or
    walk in one process leaves its records behind."""
    functions = torch.jit._state._python_cu.get_functions
    before = len(functions())
    traced = TracedDenoiser(_HoldsATensor())
    x = torch.tensor([0.5, 1.0, 2.0])
    with torch.no_grad():
        traced(None, {"x": x}), traced(None, {"x": x})
    traced(None, {"x": x}), traced(None, {"x": x})  # with gradients: a second record
    assert traced.recorded == 2
    graphs = [weakref.ref(record.graph) for record in traced.records.values()]
    del traced
    gc.collect()
    assert [g() for g in graphs] == [None, None]
    assert len(functions()) == before


class _ReadsItsInput(torch.nn.Module):
    """Python turns a tensor into a number: a record keeps the first call's number."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, x, t):
        return (self.weight * x * float(t),)


def test_a_record_that_differs_from_python_is_dropped():
    """The first replay of each record is compared with the call through Python; a record that
    kept a value it should have read (here t) is dropped, and its calls run through Python."""
    traced = TracedDenoiser(_ReadsItsInput())
    x = torch.ones(3)
    with torch.no_grad():
        outs = [traced(None, dict(x=x, t=torch.tensor(t)))[0] for t in (1.0, 2.0, 3.0)]
    assert [o[0].item() for o in outs] == [1.0, 2.0, 3.0]
    assert traced.dropped == 1 and traced.summary() == "eager"


def test_a_hooked_module_runs_eager(tiny_pipe):
    """Module hooks run in nn.Module.__call__, which a replay skips: while one is registered the
    call goes through Python, so the hook sees every call."""
    net, traced, raw = _calls(tiny_pipe, "sd")
    with torch.inference_mode():
        raw(0), raw(1)
        expected = raw(1)
        seen = []
        hook = net.mid_block.register_forward_pre_hook(lambda *_: seen.append(1))
        assert torch.equal(raw(1), expected) and torch.equal(raw(1), expected)
        hook.remove()
        raw(1)
    assert seen == [1, 1]


def test_a_call_that_cannot_be_recorded_runs_eager(tiny_pipe):
    """A dataclass output (``return_dict=True``) is not a graph output: that structure is never
    recorded and runs through Python, with the module's own result."""
    net = tiny_pipe.unet.eval()
    traced = TracedDenoiser(net)
    kwargs = dict(
        sample=torch.randn(1, 4, 8, 8),
        timestep=torch.tensor([10]),
        encoder_hidden_states=torch.randn(1, 16, net.config.cross_attention_dim),
        return_dict=True,
    )
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(traced(None, kwargs).sample, net(**kwargs).sample)
    assert traced.recorded == 0 and list(traced.records.values()) == [None]
    assert traced.summary() == "eager"


def test_replay_is_used_only_where_exact(tiny_pipe, monkeypatch):
    net = tiny_pipe.unet
    assert traceable(net, torch.float32, checkpointing=False)
    with monkeypatch.context() as m:  # PYTORCH_JIT=0: TorchScript off, calls through Python
        m.setattr(torch.jit._state._enabled, "enabled", False)
        assert not traceable(net, torch.float32, checkpointing=False)
    assert not traceable(net, torch.bfloat16, checkpointing=False)  # autocast: not recorded
    assert not traceable(net, torch.float32, checkpointing=True)  # a record would keep all
    net.enable_gradient_checkpointing()  # the caller's own switch counts too
    assert not traceable(net, torch.float32, checkpointing=False)


@pytest.mark.parametrize("native_conv", [False, True])
def test_erase_replayed_is_erase_eager(tiny_pipe, native_conv):
    """The default erase (replayed calls) and ``--no-trace-denoiser`` give bit-identical losses
    and weights, also with torch's native convolution (read when the graph runs); the run
    records which it used: one record for the calls without gradients, one with."""
    cfg = resolve(
        EraseConfig(
            concepts=["church"],
            lr=1e-3,
            num_steps=10,
            start_step=3,
            iterations=12,
            fast_cpu_conv=native_conv,
        )
    )
    base = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    runs = {}
    for trace in (True, False):
        tiny_pipe.unet.load_state_dict(base)
        runs[trace] = erase(tiny_pipe, replace(cfg, trace_denoiser=trace), False)
    assert runs[True].record["denoiser_calls"] == "replayed (2 recorded)"
    assert runs[False].record["denoiser_calls"] == "eager"
    assert runs[True].losses == runs[False].losses
    for n, t in runs[True].tensors.items():
        assert torch.equal(t, runs[False].tensors[n]), n
    assert any(not torch.equal(t, base[n]) for n, t in runs[True].tensors.items())
