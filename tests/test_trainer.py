import copy

import pytest
import torch

from kscu.config import EraseConfig, resolve
from kscu.errors import KscuError
from kscu.models import encode_prompts
from kscu.scope import trainable_names
from kscu.trainer import Trajectory, erase

SHORT = dict(num_steps=10, start_step=3, iterations=12)


def snapshot(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


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

    traj = Trajectory(tiny_pipe, cfg, lambda x, t, emb: tiny_pipe.unet(x, t, emb).sample)
    cond, uncond = encode_prompts(tiny_pipe, ["church"]), encode_prompts(tiny_pipe, [""])
    start = traj.noise(cfg.seed + 0)  # iteration 0 starts the trajectory
    for i, (_, s), x in seen[:7]:  # iterations 1..6 reuse it
        assert torch.equal(x, traj.run(start, 0, s, cond, uncond)), f"iteration {i}"
    # iteration 7 wraps to step 3: fresh noise seeded with seed + 7
    assert torch.equal(seen[7][2], traj.run(traj.noise(cfg.seed + 7), 0, 3, cond, uncond))
    # one step from x_s is the same as running to s + 1
    x5 = traj.run(start, 0, 5, cond, uncond)
    assert torch.equal(traj.step(x5, 5, cond, uncond), traj.run(start, 0, 6, cond, uncond))


def test_no_reuse_restarts_every_iteration(tiny_pipe):
    cfg = resolve(EraseConfig(concepts=["church"], lr=0.0, reuse_trajectory=False, **SHORT))
    seen = []
    erase(tiny_pipe, cfg, progress=False, callback=lambda i, e, x, _: seen.append((i, e, x)))
    traj = Trajectory(tiny_pipe, cfg, lambda x, t, emb: tiny_pipe.unet(x, t, emb).sample)
    cond, uncond = encode_prompts(tiny_pipe, ["church"]), encode_prompts(tiny_pipe, [""])
    i, (_, s), x = seen[4]
    assert torch.equal(x, traj.run(traj.noise(cfg.seed + i), 0, s, cond, uncond))


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


def test_nan_loss_stops_with_a_clear_error_and_restores_the_model(tiny_pipe):
    before = snapshot(tiny_pipe.unet)
    with pytest.raises(KscuError, match="loss became nan"):
        erase(
            tiny_pipe,
            EraseConfig(concepts=["c"], negative_guidance=float("nan"), **SHORT),
            progress=False,
        )
    after = snapshot(tiny_pipe.unet)
    assert all(torch.equal(before[n], after[n]) for n in before)
