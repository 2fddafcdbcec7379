"""kscu.optim: optimizer-in-backward takes the same Adam steps as holding every gradient."""

import copy

import pytest
import torch

from kscu.config import EraseConfig
from kscu.trainer import erase


def test_optimizer_in_backward_gives_the_plain_step_weights(tiny_pipe):
    other = copy.deepcopy(tiny_pipe)
    cfg = dict(concepts=["church"], lr=1e-3, iterations=12, num_steps=10, start_step=3)
    hooked = erase(tiny_pipe, EraseConfig(**cfg), progress=False)
    plain = erase(other, EraseConfig(optimizer_in_backward=False, **cfg), progress=False)
    # the same Adam kernel on the same tensors: bit for bit, not merely close
    assert hooked.losses == plain.losses
    for n, t in hooked.tensors.items():
        assert torch.equal(t, plain.tensors[n]), n
    # no gradient is left behind (on either path) and no hook survives the erase
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())
    assert all(p.grad is None for p in other.unet.parameters())
    before = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    for p in tiny_pipe.unet.parameters():
        p.requires_grad_(True)
    tiny_pipe.unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 16, 16)).sample.sum().backward()
    after = dict(tiny_pipe.unet.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("small", [0, 1024, 2**40])
def test_small_tensors_stepped_together_give_the_plain_step_weights(tiny_pipe, monkeypatch, small):
    """Tensors of at most SMALL_TENSOR elements wait for the end of the backward and are
    stepped in one call; the large ones in their hooks, one call each: bit for bit the plain
    step's weights, whichever tensors fall on which side."""
    import kscu.optim
    from kscu.optim import TensorAdam

    monkeypatch.setattr(kscu.optim, "SMALL_TENSOR", small)
    calls, step = [], TensorAdam.step
    monkeypatch.setattr(
        TensorAdam, "step", staticmethod(lambda s, ps: calls.append(len(ps)) or step(s, ps))
    )
    other = copy.deepcopy(tiny_pipe)
    cfg = dict(concepts=["church"], lr=1e-3, iterations=6, num_steps=10, start_step=3)
    hooked = erase(tiny_pipe, EraseConfig(**cfg), progress=False)
    monkeypatch.setattr(TensorAdam, "step", staticmethod(step))
    plain = erase(other, EraseConfig(optimizer_in_backward=False, **cfg), progress=False)
    assert hooked.losses == plain.losses
    for n, t in hooked.tensors.items():
        assert torch.equal(t, plain.tensors[n]), n
    sizes = [p.numel() for n, p in tiny_pipe.unet.named_parameters() if n in hooked.tensors]
    n_small = sum(size <= small for size in sizes)
    per_iteration = sorted([1] * (len(sizes) - n_small) + ([n_small] if n_small else []))
    assert sorted(calls) == sorted(per_iteration * cfg["iterations"])
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())


def test_offloaded_adam_state_gives_the_same_weights(tiny_pipe, monkeypatch):
    """--offload-adam: the moments live in host memory apart from the device's step copies and
    go back after each step (were they not copied back, the second step would restart them
    from zero and the weights would differ)."""
    from kscu.optim import TensorAdam

    steppers, step = [], TensorAdam.__call__
    monkeypatch.setattr(
        TensorAdam, "__call__", lambda self, p: steppers.append((self, p)) or step(self, p)
    )
    other = copy.deepcopy(tiny_pipe)
    cfg = dict(concepts=["church"], lr=1e-3, iterations=12, num_steps=10, start_step=3)
    offloaded = erase(tiny_pipe, EraseConfig(offload_adam=True, **cfg), progress=False)
    assert steppers and all(s.offload for s, _ in steppers)
    exact = erase(other, EraseConfig(**cfg), progress=False)
    assert offloaded.losses == exact.losses
    for n, t in offloaded.tensors.items():
        assert torch.equal(t, exact.tensors[n]), n
    for stepper, p in steppers:
        m, v, _ = stepper.state
        assert m.device.type == v.device.type == "cpu" and m.shape == p.shape
        assert v.abs().sum() > 0  # the moments came back from their steps
        assert m.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()


def test_frozen_copy_in_the_compute_dtype_predicts_as_the_float32_original(tiny_pipe):
    """Under bf16 autocast Linear/Conv2d cast their weights to bf16 anyway: a bf16 frozen copy
    of the trainable tensors gives bit-identical frozen predictions."""
    from torch.func import functional_call

    from kscu.scope import trainable_names

    unet = tiny_pipe.unet
    params = dict(unet.named_parameters())
    names = trainable_names(unet, "noxattn")
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = functional_call(unet, {n: params[n].detach() for n in names}, (x, 500, emb))
        bf16 = functional_call(
            unet, {n: params[n].detach().bfloat16() for n in names}, (x, 500, emb)
        )
    assert torch.equal(fp32.sample, bf16.sample)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradient_checkpointing_changes_nothing_but_memory(tiny_pipe, monkeypatch, dtype):
    """Under bf16 the checkpointed path also runs autocast without its cast cache."""
    import torch.utils.checkpoint

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    )
    other = copy.deepcopy(tiny_pipe)
    cfg = dict(concepts=["church"], lr=1e-3, iterations=6, num_steps=10, start_step=3, dtype=dtype)
    on = erase(tiny_pipe, EraseConfig(gradient_checkpointing=True, **cfg), progress=False)
    assert calls  # diffusers' checkpointing really ran in the edited forward
    off = erase(other, EraseConfig(**cfg), progress=False)
    assert torch.allclose(torch.tensor(on.losses), torch.tensor(off.losses), rtol=1e-5)
    for n, t in on.tensors.items():
        assert torch.allclose(t, off.tensors[n], rtol=0, atol=1e-6), n
    assert not tiny_pipe.unet.is_gradient_checkpointing  # switched back off


def test_lean_adam_matches_adam_closely_and_halves_its_state():
    """bf16 moments with stochastic rounding: near Adam's update, unbiased rounding."""
    from kscu.optim import LeanAdam, stochastic_bf16

    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2**-10)  # halfway-ish between two bf16 values
    rounded = stochastic_bf16(x, g).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0078125}
    assert abs(rounded.mean().item() - x[0].item()) < 1e-4  # unbiased on average
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4096))
    b = torch.nn.Parameter(a.detach().clone())
    start = a.detach().clone()
    exact, lean = torch.optim.Adam([a], lr=1e-3), LeanAdam([b], lr=1e-3)
    for _ in range(50):
        grad = torch.randn(4096)
        for p, opt in ((a, exact), (b, lean)):
            p.grad = grad.clone()
            opt.step()
    da, db = a.detach() - start, b.detach() - start
    cos = torch.nn.functional.cosine_similarity(da, db, dim=0)
    assert cos > 0.999
    assert lean.state[b]["m"].dtype == torch.bfloat16 and lean.state[b]["v"].dtype == torch.bfloat16


def test_lean_adam_rounds_each_tensor_with_its_own_noise():
    """Stepped tensor by tensor, two tensors with the same values and gradients must not draw
    the same rounding noise (one shared seed made their moments, and so their steps, equal)."""
    from kscu.optim import AdamSteps

    torch.manual_seed(0)
    start, g = torch.randn(10_000), torch.randn(10_000)
    a, b = (torch.nn.Parameter(start.clone()) for _ in range(2))
    steps = AdamSteps([a, b], lr=1e-3, lean_state=True)
    for _ in range(3):
        steps.backward((a * g).sum() + (b * g).sum())
    steps.close()
    assert not torch.equal(a, b)
    assert torch.allclose(a, b, rtol=0, atol=3e-5)  # steps of 1e-3 that differ by rounding only


def test_a_backward_that_raises_leaves_no_gradient(tiny_pipe, monkeypatch):
    """An error in the backward (Ctrl-C arrives in a hook) after the small tensors' gradients are
    complete but before their step: none is left on the pipeline for a later erase to add to."""
    from kscu.optim import TensorAdam

    def interrupted(steppers, params):
        raise KeyboardInterrupt

    monkeypatch.setattr(TensorAdam, "step", staticmethod(interrupted))
    cfg = EraseConfig(concepts=["church"], lr=1e-3, iterations=3, num_steps=10, start_step=3)
    with pytest.raises(KeyboardInterrupt):
        erase(tiny_pipe, cfg, progress=False)
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())


@pytest.mark.parametrize("options", [{}, {"offload_state": True}, {"lean_state": True}])
def test_adam_state_is_made_before_the_first_forward(monkeypatch, options):
    """Every moment exists (zeros) once the steps are set up, and the first backward steps into
    that memory rather than allocating the state among its activations (kscu.allocator's heap
    kept it apart from the buffers an iteration frees and takes back)."""
    import kscu.optim
    from kscu.optim import AdamSteps, LeanAdam, TensorAdam

    monkeypatch.setattr(kscu.optim, "SMALL_TENSOR", 10)  # both kinds of step: 8 and 64 elements
    made: list = []
    for cls in (TensorAdam, LeanAdam):
        init = cls.__init__
        monkeypatch.setattr(
            cls,
            "__init__",
            lambda self, *a, _init=init, **k: made.append(self) or _init(self, *a, **k),
        )
    params = [torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8, 8))]
    adam = AdamSteps(params, lr=1e-3, **options)
    moments = []
    for opt in made:
        states = (
            [opt.state]
            if isinstance(opt, TensorAdam)
            else [opt.state[p] for p in params if p in opt.state]
        )
        for state in states:
            m, v = (state[0], state[1]) if isinstance(state, tuple) else (state["m"], state["v"])
            assert not m.any() and not v.any()
            moments += [m, v]
    assert len(moments) == 2 * len(params)
    where = [t.untyped_storage().data_ptr() for t in moments]
    adam.backward(sum((p * p).sum() for p in params))
    assert [t.untyped_storage().data_ptr() for t in moments] == where
    assert all(t.any() for t in moments)  # the step wrote into them
    adam.close()


def test_no_hook_is_left_when_the_moments_do_not_fit(monkeypatch):
    """Making the moments can run out of memory (a GPU too small): the caller's parameters must
    not keep hooks from the half-built steps, or their next backward would take Adam steps."""
    from kscu.optim import AdamSteps, TensorAdam

    made, new_state = [], TensorAdam._new_state

    def tight(self, p):
        if len(made) == 1:
            raise torch.OutOfMemoryError("no room for the moments")
        made.append(p)
        return new_state(self, p)

    monkeypatch.setattr(TensorAdam, "_new_state", tight)
    params = [torch.nn.Parameter(torch.ones(2**17)) for _ in range(2)]  # stepped one by one
    with pytest.raises(torch.OutOfMemoryError):
        AdamSteps(params, lr=1e-3)
    (params[0] * params[1]).sum().backward()
    assert all(torch.equal(p, torch.ones(2**17)) for p in params)  # no step was taken
