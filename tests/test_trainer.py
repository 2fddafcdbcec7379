import copy
import re
from dataclasses import replace

import pytest
import torch

from kscu.allocator import LABELS, glibc, heap_info, huge_page_bytes
from kscu.config import EraseConfig, resolve
from kscu.errors import KscuError
from kscu.families import family_of
from kscu.optim import TensorAdam
from kscu.scope import trainable_names
from kscu.trainer import erase

SHORT = dict(num_steps=10, start_step=3, iterations=12)


def snapshot(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


class Walk:
    """The edited model's trajectory for one prompt, walked from noise by the family's sampler."""

    def __init__(self, pipe, cfg, prompt):
        family = family_of(pipe)
        self.sampler = family.sampler(pipe, cfg.num_steps, cfg.resolution)
        self.cond, self.uncond = family.encode(pipe, [prompt]), family.encode(pipe, [""])
        self.guidance = cfg.trajectory_guidance
        self.raw = lambda x, s, c: self.sampler.raw(pipe.unet, x, s, c)

    def noise(self, seed):
        return self.sampler.noise(seed)

    @torch.no_grad()
    def step(self, x, s):
        return self.sampler.guided_step(self.raw, x, s, self.cond, self.uncond, self.guidance)

    def run(self, x, stop):
        for s in range(stop):
            x = self.step(x, s)
        return x


def test_lr_zero_moves_no_weight(tiny_pipe):
    before = snapshot(tiny_pipe.unet)
    result = erase(tiny_pipe, EraseConfig(concepts=["church"], lr=0.0, **SHORT), progress=False)
    after = snapshot(tiny_pipe.unet)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(before[n], t) for n, t in result.tensors.items())
    assert len(result.losses) == 12 and all(v > 0 for v in result.losses)


def test_reused_trajectory_equals_denoising_from_step_zero(tiny_pipe):
    """With lr = 0 the model never changes, so x_s advanced step by step (reuse) must equal
    x_s denoised from the same starting noise in one go, bit for bit."""
    cfg = resolve(EraseConfig(concepts=["church"], lr=0.0, augment=False, **SHORT))
    seen = []
    erase(tiny_pipe, cfg, progress=False, callback=lambda i, e, x, _: seen.append((i, e, x)))
    table = [e for _, e, _ in seen]
    assert table[:8] == [("church", s) for s in range(3, 10)] + [("church", 3)]

    traj = Walk(tiny_pipe, cfg, "church")
    start = traj.noise(cfg.seed + 0)  # iteration 0 starts the trajectory
    for i, (_, s), x in seen[:7]:  # iterations 1..6 reuse it
        assert torch.equal(x, traj.run(start, s)), f"iteration {i}"
    # iteration 7 wraps to step 3: fresh noise seeded with seed + 7
    assert torch.equal(seen[7][2], traj.run(traj.noise(cfg.seed + 7), 3))
    # one step from x_s is the same as running to s + 1
    assert torch.equal(traj.step(traj.run(start, 5), 5), traj.run(start, 6))


def test_no_reuse_restarts_every_iteration(tiny_pipe):
    cfg = resolve(EraseConfig(concepts=["church"], lr=0.0, reuse_trajectory=False, **SHORT))
    seen = []
    erase(tiny_pipe, cfg, progress=False, callback=lambda i, e, x, _: seen.append((i, e, x)))
    traj = Walk(tiny_pipe, cfg, "church")
    i, (_, s), x = seen[4]
    assert torch.equal(x, traj.run(traj.noise(cfg.seed + i), s))


@pytest.mark.parametrize("scope", ["xattn", "noxattn", "selfattn"])
def test_only_the_scope_changes(tiny_pipe, scope):
    before = snapshot(tiny_pipe.unet)
    erase(
        tiny_pipe, EraseConfig(concepts=["church"], scope=scope, lr=1e-3, **SHORT), progress=False
    )
    after = snapshot(tiny_pipe.unet)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(trainable_names(tiny_pipe.unet, scope))


def test_bf16_compute_keeps_every_update(tiny_pipe):
    """lr = 1e-5 steps are below half a bf16 ulp of most weights: the float32 master weights
    must still move every trainable element (KSCU_METHOD.md section 8)."""
    pipe = tiny_pipe.to(dtype=torch.bfloat16)
    names = trainable_names(pipe.unet, "noxattn")
    params = dict(pipe.unet.named_parameters())
    before = {n: params[n].detach().float().clone() for n in names}
    cfg = EraseConfig(
        concepts=["church"], dtype="bfloat16", iterations=3, num_steps=10, start_step=3, lr=1e-5
    )
    result = erase(pipe, cfg, progress=False)
    total = sum(before[n].numel() for n in names)
    changed = sum((result.tensors[n] != before[n]).sum().item() for n in names) / total
    # An element whose gradient is exactly zero in all three steps may legitimately stay put
    # (seen: 1 of 48,956 with one CPU's bf16 kernels), hence issue #4's bar rather than "all".
    assert changed >= 0.999, changed
    # the same updates stored in bf16 would mostly be lost: the failure mode we avoid
    lost = (
        sum((result.tensors[n].bfloat16().float() == before[n]).sum().item() for n in names) / total
    )
    assert lost > 0.5
    assert all(p.dtype == torch.bfloat16 for p in pipe.unet.parameters())


def test_same_seed_same_weights(tiny_pipe):
    other = copy.deepcopy(tiny_pipe)
    cfg = EraseConfig(concepts=["church", "cat"], lr=1e-3, seed=5, **SHORT)
    a = erase(tiny_pipe, cfg, progress=False)
    b = erase(other, cfg, progress=False)
    assert a.losses == b.losses
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    assert [c for c, _ in a.schedule] == ["church"] * 7 + ["cat"] * 5


def test_augmentation_only_in_the_last_five_percent(tiny_pipe):
    other = copy.deepcopy(tiny_pipe)
    cfg = dict(concepts=["church"], lr=1e-3, num_steps=10, start_step=3, iterations=40)
    on = erase(tiny_pipe, EraseConfig(**cfg), progress=False).losses
    off = erase(other, EraseConfig(augment=False, **cfg), progress=False).losses
    assert on[:38] == off[:38]  # ceil(0.05 * 40) = 2 augmented iterations
    assert on[38] != off[38] and on[39] != off[39]


def test_v_prediction_model():
    from tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(prediction_type="v_prediction")
    result = erase(pipe, EraseConfig(concepts=["church"], lr=1e-3, **SHORT), progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_esd_uses_uniform_steps_and_no_leak_term(tiny_pipe):
    result = erase(
        tiny_pipe,
        EraseConfig(concepts=["church"], method="esd", num_steps=10, iterations=60),
        progress=False,
    )
    assert result.config.lambda2 == 0.0
    assert {s for _, s in result.schedule} == set(range(10))


def test_nan_loss_stops_with_a_clear_error_and_restores_the_model(tiny_pipe, monkeypatch):
    """A loss that turns NaN after some steps (a non-finite setting is refused earlier)."""
    import kscu.trainer

    calls = []
    exact = kscu.trainer.kscu_loss

    def diverging(*args):
        calls.append(1)
        loss = exact(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(kscu.trainer, "kscu_loss", diverging)
    before = snapshot(tiny_pipe.unet)
    # the fix names --lr and, since stop 41, the settings that also overflow when raised
    fix = r"lower --lr \(or, if you raised them, --negative-guidance, --trajectory-guidance"
    with pytest.raises(KscuError, match=rf"loss became nan at iteration 2 \(step \d+\); {fix}"):
        erase(tiny_pipe, EraseConfig(concepts=["c"], **SHORT), progress=False)
    after = snapshot(tiny_pipe.unet)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_failed_erase_restores_the_callers_storage(tiny_pipe, dtype):
    """Before: the restore gave the trainable tensors new storage, so a ``state_dict()`` taken
    before the erase (which shares the parameters' memory) kept the stepped values in float32."""
    backup = tiny_pipe.unet.state_dict()  # shares the parameters' storage, as users take it
    values = {n: t.clone() for n, t in backup.items()}
    pointers = {n: p.data_ptr() for n, p in tiny_pipe.unet.named_parameters()}

    def stop(i, entry, x, loss):
        if i == 2:  # after two Adam steps
            raise RuntimeError("stopped by the test")

    cfg = EraseConfig(concepts=["c"], dtype=dtype, **SHORT)
    with pytest.raises(RuntimeError, match="stopped by the test"):
        erase(tiny_pipe, cfg, progress=False, callback=stop)
    assert all(torch.equal(backup[n], values[n]) for n in backup)
    after = dict(tiny_pipe.unet.named_parameters())
    assert all(after[n].data_ptr() == ptr for n, ptr in pointers.items())
    assert all(torch.equal(after[n], values[n]) for n in after)


def test_a_bf16_denoiser_is_its_own_frozen_copy(tiny_pipe, monkeypatch):
    """Loaded in the compute dtype, the trainable tensors' own storage serves the frozen calls
    (no second copy: on a CPU the loaded one is the checkpoint's memory map and stays resident);
    the masters are new float32 tensors, so the frozen values never move. float32 must copy."""
    from kscu.families.sd import DDIMSampler

    frozen_params = []
    raw = DDIMSampler.raw

    def spy(self, module, x, s, cond, params=None):
        if params is not None:
            frozen_params.append(params)
        return raw(self, module, x, s, cond, params=params)

    monkeypatch.setattr(DDIMSampler, "raw", spy)
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        pipe = tiny_pipe.to(dtype=torch_dtype)
        names = trainable_names(pipe.unet, "noxattn")
        loaded = {n: p.detach() for n, p in pipe.unet.named_parameters() if n in names}
        values = {n: t.clone() for n, t in loaded.items()}
        frozen_params.clear()
        erase(pipe, EraseConfig(concepts=["church"], dtype=dtype, lr=1e-3, **SHORT), False)
        seen = frozen_params[-1]
        shared = [seen[n].data_ptr() == loaded[n].data_ptr() for n in names]
        assert all(shared) if dtype == "bfloat16" else not any(shared), dtype
        assert all(torch.equal(seen[n], values[n]) for n in names)  # the base, never stepped


def test_bf16_compute_saves_exactly_base_plus_update(tiny_pipe):
    """A float32 base erased with bf16 compute: saved - base is the float32 masters' summed
    Adam steps, with no bf16 rounding of the base, and sub-ulp updates survive."""
    params = dict(tiny_pipe.unet.named_parameters())
    names = trainable_names(tiny_pipe.unet, "noxattn")
    base = {n: params[n].detach().double().clone() for n in names}
    steps = {n: torch.zeros_like(base[n]) for n in names}
    tensor_step = TensorAdam.step  # every trainable tensor's Adam steps (kscu.optim)
    name_of = {id(params[n]): n for n in names}

    def counting_step(steppers, stepped):
        before = [p.detach().double().clone() for p in stepped]
        tensor_step(steppers, stepped)
        for p, b in zip(stepped, before, strict=True):
            steps[name_of[id(p)]] += p.detach().double() - b

    cfg = EraseConfig(
        concepts=["church"], dtype="bfloat16", iterations=4, num_steps=10, start_step=3, lr=1e-5
    )
    with pytest.MonkeyPatch.context() as m:
        m.setattr(TensorAdam, "step", staticmethod(counting_step))
        result = erase(tiny_pipe, cfg, progress=False)
    total = changed = sub_ulp = 0
    for n in names:
        delta = result.tensors[n].double() - base[n]
        assert torch.allclose(delta, steps[n], rtol=0, atol=1e-12), n
        ulp = (base[n].abs().float().bfloat16().float().double() * 2.0**-8).clamp_min(1e-30)
        changed += (delta != 0).sum().item()
        sub_ulp += ((delta != 0) & (delta.abs() < ulp / 2)).sum().item()
        total += delta.numel()
    assert changed / total >= 0.999, changed / total
    assert sub_ulp > 0  # updates below half a bf16 ulp of their weight were kept
    assert all(p.dtype == torch.float32 for p in tiny_pipe.unet.parameters())


def test_failed_erase_leaves_the_pipeline_and_rng_as_they_were(tiny_pipe, monkeypatch):
    unet = tiny_pipe.unet.to(torch.bfloat16).train()
    unet.conv_in.weight.requires_grad_(True)
    before = snapshot(unet)
    storage = {n: p.data_ptr() for n, p in unet.named_parameters()}
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    rng = torch.random.get_rng_state()

    def interrupt(i, *_):
        if i == 2:
            raise KeyboardInterrupt

    cfg = EraseConfig(concepts=["church"], dtype="bfloat16", lr=1e-2, **SHORT)
    with pytest.raises(KeyboardInterrupt):
        erase(tiny_pipe, cfg, progress=False, callback=interrupt)
    # bf16 weights are their own frozen copy (kscu.trainer._frozen): each goes back as loaded
    assert {n: p.data_ptr() for n, p in unet.named_parameters()} == storage
    monkeypatch.setattr(
        "kscu.trainer.augmented_prompts", lambda *a: (_ for _ in ()).throw(ValueError("bad"))
    )
    with pytest.raises(ValueError):
        erase(tiny_pipe, cfg, progress=False)
    after = snapshot(unet)
    assert all(torch.equal(before[n], after[n]) and after[n].dtype == torch.bfloat16 for n in after)
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert unet.training
    assert torch.equal(rng, torch.random.get_rng_state())  # never reseeded behind our back


def test_successful_erase_does_not_touch_the_global_rng(tiny_pipe):
    rng = torch.random.get_rng_state()
    erase(tiny_pipe, EraseConfig(concepts=["church"], lr=1e-3, **SHORT), progress=False)
    assert torch.equal(rng, torch.random.get_rng_state())


def test_float16_uses_the_grad_scaler_and_keeps_float32_masters(tiny_pipe, monkeypatch):
    scaled = []
    scale = torch.amp.GradScaler.scale
    monkeypatch.setattr(
        torch.amp.GradScaler, "scale", lambda self, x: scaled.append(1) or scale(self, x)
    )
    before = snapshot(tiny_pipe.unet)
    cfg = EraseConfig(concepts=["church"], dtype="float16", lr=1e-3, **SHORT)
    result = erase(tiny_pipe, cfg, progress=False)
    assert len(scaled) == 12 and all(torch.isfinite(torch.tensor(result.losses)))
    moved = [n for n, t in result.tensors.items() if not torch.equal(t, before[n])]
    assert len(moved) == len(result.tensors)


def test_float16_overflow_names_the_fix(tiny_pipe):
    tiny_pipe.unet.conv_out.register_forward_hook(lambda m, i, out: out * 1e6)
    cfg = EraseConfig(concepts=["church"], dtype="float16", **SHORT)
    with pytest.raises(KscuError, match="float16 overflowed.*use --dtype bfloat16"):
        erase(tiny_pipe, cfg, progress=False)


@pytest.mark.parametrize("dtype,least,most", [("float32", 0.99, 1.0), ("bfloat16", 1e-4, 0.2)])
def test_embedding_noise_reaches_the_network(tiny_pipe, dtype, least, most):
    """What the first projection of the text embedding (attn2.to_k) sees in augmented
    iterations: the noisy float32 embedding; under bf16 autocast, its bf16 rounding, in which
    the 1e-5 noise flips only the elements near a rounding boundary (0% before the fix)."""
    to_k = next(m for n, m in tiny_pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    cfg = EraseConfig(concepts=["church"], dtype=dtype, lr=0.0, **SHORT)  # 1 augmented
    seen = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr("kscu.trainer.augmented_prompts", lambda c, *a: ["church"] * 10)
        handle = to_k.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
        erase(tiny_pipe, cfg, progress=False)
        handle.remove()
    # last iteration: frozen call (rows "church", "") then the edited one (augmented, "")
    plain, augmented = seen[-2][:1], seen[-1][:1]
    assert augmented.dtype == torch.float32
    reached = augmented.to(torch.bfloat16) if dtype == "bfloat16" else augmented
    reference = plain.to(reached.dtype)
    share = (reached != reference).float().mean().item()
    print(f"{dtype}: {share:.4%} of the embedding's elements differ where it enters the network")
    assert least <= share <= most, share


def test_fast_cpu_conv_switches_only_the_convolution_kernel(tiny_pipe):
    """--fast-cpu-conv runs the loop without oneDNN (restored after, also after an error) and
    agrees with the default kernels to float rounding; it is not bit-identical, hence opt-in."""
    cfg = resolve(EraseConfig(concepts=["church"], lr=1e-3, augment=False, **SHORT))
    base = snapshot(tiny_pipe.unet)
    runs = {}
    for native in (False, True):
        tiny_pipe.unet.load_state_dict(base)
        seen = []

        def look(i, e, x, loss, seen=seen):
            seen.append((loss, torch.backends.mkldnn.enabled))

        result = erase(tiny_pipe, replace(cfg, fast_cpu_conv=native), False, look)
        assert {on for _, on in seen} == {not native}
        assert torch.backends.mkldnn.enabled  # restored
        assert result.record["convolution"].startswith("torch native" if native else "torch def")
        weights = {n: t.clone() for n, t in result.tensors.items()}  # the next run reuses them
        runs[native] = (torch.tensor([loss for loss, _ in seen]), weights)
    (a, wa), (b, wb) = runs[False], runs[True]
    assert torch.allclose(a, b, rtol=1e-4, atol=0), (a - b).abs().max()
    delta_a = torch.cat([(wa[n] - base[n]).flatten() for n in wa])
    delta_b = torch.cat([(wb[n] - base[n]).flatten() for n in wa])
    assert delta_a.abs().max() > 1e-4  # the weights moved
    assert 0 < (delta_a - delta_b).norm() / delta_a.norm() < 1e-3  # close, not bit-identical

    def fail(*_):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        erase(tiny_pipe, replace(cfg, fast_cpu_conv=True), False, fail)
    assert torch.backends.mkldnn.enabled


def test_reusing_freed_memory_changes_no_value(tiny_pipe):
    """The allocator setting (SD's default on a CPU) gives bit-identical weights and losses, and the
    run records which allocator it had."""
    cfg = resolve(EraseConfig(concepts=["church"], lr=1e-3, augment=False, **SHORT))
    base = snapshot(tiny_pipe.unet)
    runs = {}
    for reuse in (True, False):
        tiny_pipe.unet.load_state_dict(base)
        result = erase(tiny_pipe, replace(cfg, reuse_freed_memory=reuse), False)
        expected = LABELS[reuse]
        if glibc() is not None:
            assert result.record["host_allocator"] == expected
        if heap_info() is not None:
            assert result.record["host_heap_free_bytes"] >= 0
        if huge_page_bytes() is not None:
            assert result.record["host_huge_page_bytes"] >= 0
        runs[reuse] = (result.losses, {n: t.clone() for n, t in result.tensors.items()})
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(runs[True][1][n], runs[False][1][n]) for n in runs[True][1])
    assert any(not torch.equal(runs[True][1][n], base[n]) for n in runs[True][1])  # it moved


def test_adam_moments_are_made_after_the_encoders_leave_and_before_the_loop(tiny_pipe, monkeypatch):
    """The moments exist before the allocator starts keeping freed blocks (so they sit apart from
    the buffers the loop reuses) and after the encoders left the accelerator (so they do not add
    to its peak while the prompts are encoded)."""
    import contextlib

    import kscu.trainer

    events: list[str] = []
    offload, host_memory, init = (
        kscu.trainer.offload_modules,
        kscu.trainer.host_memory,
        TensorAdam.__init__,
    )
    monkeypatch.setattr(
        kscu.trainer, "offload_modules", lambda *a: events.append("offload") or offload(*a)
    )
    monkeypatch.setattr(
        TensorAdam,
        "__init__",
        lambda self, *a, **k: events.append("moments") or init(self, *a, **k),
    )

    @contextlib.contextmanager
    def loop_memory(*a):
        events.append("loop")
        with host_memory(*a) as applied:
            yield applied

    monkeypatch.setattr(kscu.trainer, "host_memory", loop_memory)
    result = erase(tiny_pipe, EraseConfig(concepts=["church"], lr=1e-3, **SHORT), False)
    assert events == ["offload", *["moments"] * len(result.tensors), "loop"]


def test_only_the_edited_forward_records_autograd(tiny_pipe):
    """The trajectory walk and the frozen predictions run in inference mode (no autograd
    bookkeeping: the same kernels on the same values, a few percent less time per call on a small
    model); the edited forward keeps autograd, and the callback gets an ordinary tensor."""
    cfg = resolve(EraseConfig(concepts=["church"], lr=1e-3, augment=False, **SHORT))
    modes = []
    hook = tiny_pipe.unet.register_forward_pre_hook(
        lambda *_: modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
    )
    xs = []
    erase(tiny_pipe, cfg, progress=False, callback=lambda i, e, x, _: xs.append(x))
    hook.remove()
    # iteration 0 walks 3 steps from noise, then frozen (inference) and edited (grad) pairs
    assert modes[:5] == [(True, False)] * 4 + [(False, True)]
    assert modes.count((False, True)) == cfg.iterations
    assert set(modes) == {(True, False), (False, True)}
    assert not any(x.is_inference() for x in xs)
    xs[0].add_(1)  # usable as any tensor


# Pipelines as users hold them (review of the Python API, stop 36). Each failed deep in torch,
# or edited something other than the base model's weights, before.


def _erased(pipe, **overrides):
    cfg = EraseConfig(concepts=["church"], lr=1e-3, **(SHORT | overrides))
    return erase(pipe, cfg, progress=False).tensors


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_an_erase_inside_a_no_grad_block_is_the_same_erase(tiny_pipe, mode):
    """Before: "element 0 of tensors does not require grad" at the first backward."""
    expected = _erased(copy.deepcopy(tiny_pipe))
    with getattr(torch, mode)():
        got = _erased(tiny_pipe)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[n], got[n]) for n in expected)


@pytest.mark.parametrize("optimizer_in_backward", [True, False])
def test_a_gradient_left_on_the_denoiser_changes_nothing(tiny_pipe, optimizer_in_backward):
    """Before: with optimizer-in-backward the caller's stale .grad was added into the first
    Adam steps (every trained tensor differed from a clean erase's)."""
    expected = _erased(copy.deepcopy(tiny_pipe), optimizer_in_backward=optimizer_in_backward)
    for p in tiny_pipe.unet.parameters():
        p.grad = torch.randn_like(p)
    got = _erased(tiny_pipe, optimizer_in_backward=optimizer_in_backward)
    assert all(torch.equal(expected[n], got[n]) for n in expected)


def test_a_compiled_denoiser_is_erased_under_its_own_names(tiny_pipe):
    """Before: the keys carried torch.compile's _orig_mod. prefix, which no base model has."""
    expected = _erased(copy.deepcopy(tiny_pipe))
    tiny_pipe.unet = torch.compile(tiny_pipe.unet, backend="eager")
    got = _erased(tiny_pipe)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[n], got[n]) for n in expected)


def test_half_weights_of_the_other_half_dtype_are_one_line(tiny_pipe):
    """Before: "mixed dtype (CPU): expect parameter to have scalar type of Float" mid-forward."""
    tiny_pipe.unet.to(torch.float16)
    before = snapshot(tiny_pipe.unet)
    with pytest.raises(KscuError) as e:
        _erased(tiny_pipe, dtype="bfloat16")
    assert str(e.value) == (
        "the unet holds float16 weights but the compute dtype is bfloat16; load it in float32 "
        "(exact for any compute dtype) or set dtype to float16"
    )
    after = snapshot(tiny_pipe.unet)
    assert all(torch.equal(before[n], after[n]) and after[n].dtype == torch.float16 for n in before)


def _with_lora(pipe):
    pipe.unet.peft_config = {"default": "LoraConfig(r=4)"}  # what diffusers' peft layer sets


def _offloaded(pipe):
    weight = pipe.unet.conv_in.weight  # accelerate's sequential offload leaves them on meta
    pipe.unet.conv_in.weight = torch.nn.Parameter(torch.empty_like(weight, device="meta"))


def _fused(pipe):
    pipe.fuse_qkv_projections()


def _model_offloaded(pipe):  # what enable_model_cpu_offload() leaves on a GPU machine
    from accelerate.hooks import CpuOffload, add_hook_to_module

    add_hook_to_module(pipe.unet, CpuOffload(execution_device="cuda:0"))


@pytest.mark.parametrize(
    "hold, words",
    [
        (_with_lora, "the unet holds LoRA adapters (default); fuse them into the weights"),
        (_offloaded, "the unet's weights are on the meta device (enable_sequential_cpu_offload?)"),
        (_fused, "the unet's attention projections are fused (fuse_qkv_projections); call"),
        (_model_offloaded, "the unet sits on cpu and runs on cuda:0 (enable_model_cpu_offload)"),
    ],
)
def test_a_denoiser_held_in_a_state_an_erase_cannot_edit_is_one_line(tiny_pipe, hold, words):
    """Before: LoRA adapters were trained and saved under keys no base model has; meta weights
    failed deep in torch; a fused projection was trained and lost on unfusing."""
    hold(tiny_pipe)
    with pytest.raises(KscuError, match=re.escape(words)):
        _erased(tiny_pipe)


def test_a_subclass_of_a_known_pipeline_and_a_named_family_are_erased(tiny_pipe):
    """Before: "the pipeline is a MyPipeline, which kscu does not support ... (or name one with
    --family)", and EraseConfig(family="sd") was ignored by erase()."""
    from diffusers import StableDiffusionPipeline

    class MyPipeline(StableDiffusionPipeline):
        pass

    expected = _erased(copy.deepcopy(tiny_pipe))
    mine = copy.deepcopy(tiny_pipe)
    mine.__class__ = MyPipeline
    got = _erased(mine)
    assert all(torch.equal(expected[n], got[n]) for n in expected)

    class Unrelated:  # a pipeline class kscu knows nothing of, holding SD's parts
        pass

    other = Unrelated()
    other.__dict__.update(tiny_pipe.components, vae_scale_factor=tiny_pipe.vae_scale_factor)
    with pytest.raises(KscuError, match="the pipeline is a Unrelated, which kscu does not"):
        _erased(other)
    got = _erased(other, family="sd")
    assert all(torch.equal(expected[n], got[n]) for n in expected)
