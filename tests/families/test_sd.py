"""The Stable Diffusion family: the pinned DDIM sampler and the loss space of v-prediction."""

import copy
import logging
from dataclasses import replace

import pytest
import torch

from kscu.config import EraseConfig
from kscu.families import family_of
from kscu.families.sd import pinned_ddim
from kscu.trainer import erase

SD_50 = [981 - 20 * s for s in range(50)]


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    """Each test sees the pinned-sampler notice afresh (it is logged once per process)."""
    import kscu.families.sd

    monkeypatch.setattr(kscu.families.sd, "_announced", set())


def test_pinned_ddim_ignores_a_pndm_config_without_clip_sample(caplog):
    from diffusers import PNDMScheduler

    pndm = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True
    )
    config = {k: v for k, v in pndm.config.items() if k != "clip_sample"}
    config["_class_name"] = "PNDMScheduler"
    with caplog.at_level(logging.INFO, logger="kscu"):
        ddim = pinned_ddim(config)
    assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
    assert torch.equal(ddim.betas, pndm.betas)
    ddim.set_timesteps(50)
    assert [int(t) for t in ddim.timesteps] == SD_50
    lines = [r.getMessage() for r in caplog.records]
    assert (
        len(lines) == 1 and "PNDMScheduler" in lines[0] and "clip_sample unset -> False" in lines[0]
    )


@pytest.mark.parametrize(
    "setting", [{"timestep_spacing": "trailing"}, {"rescale_betas_zero_snr": True}]
)
def test_pinned_ddim_keeps_sd_timesteps_whatever_the_model_config(tiny_pipe, setting, caplog):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config, **setting)
    with caplog.at_level(logging.INFO, logger="kscu"):
        sampler = family_of(tiny_pipe).sampler(tiny_pipe, 50)
    assert sampler.timesteps == SD_50
    assert next(iter(setting)) in caplog.text
    # the noise schedule is SD's (zero-SNR rescaling is not applied behind the user's back)
    assert sampler.scheduler.alphas_cumprod[-1] > 0


def test_the_model_prediction_type_and_betas_are_kept(tiny_pipe):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(
        tiny_pipe.scheduler.config, prediction_type="v_prediction", beta_end=0.02
    )
    sampler = family_of(tiny_pipe).sampler(tiny_pipe, 50)
    assert sampler.prediction_type == "v_prediction"
    assert sampler.scheduler.config.beta_end == 0.02


def v_twin(pipe):
    """The same network with its output converted to v: v = (eps - sqrt(1-abar) x) / sqrt(abar)."""
    from kscu.models import sd_ddim_scheduler

    twin = copy.deepcopy(pipe)
    twin.scheduler = sd_ddim_scheduler("v_prediction")
    abar = twin.scheduler.alphas_cumprod

    def to_v(module, args, kwargs, out):
        x, t = kwargs["sample"], int(kwargs["timestep"])
        a = abar[t]
        v = (out[0].double() - (1 - a).sqrt() * x.double()) / a.sqrt()
        return (v.to(out[0].dtype),)

    twin.unet.register_forward_hook(to_v, with_kwargs=True)
    return twin


def first_gradients(pipe, cfg, monkeypatch):
    """The gradient of every trainable tensor at the first Adam step, and the run."""
    from kscu.optim import TensorAdam

    grads = {}
    step = TensorAdam.step

    def capture(steppers, params):  # each tensor's first gradient (one Adam step per tensor)
        for p in params:
            grads.setdefault(id(p), p.grad.detach().clone())
        step(steppers, params)

    monkeypatch.setattr(TensorAdam, "step", staticmethod(capture))
    result = erase(pipe, cfg, progress=False)
    monkeypatch.setattr(TensorAdam, "step", staticmethod(step))
    return torch.cat([g.flatten() for g in grads.values()]), result


def test_v_twin_gives_the_same_losses_and_updates_in_epsilon_space(tiny_pipe, monkeypatch):
    """Same losses and gradients to 1e-5; the total update to 1e-4 (measured 5.7e-5 after 5
    iterations): Adam's first steps are about lr * sign(g) for any nonzero gradient, so float
    noise in near-zero gradients shows up as lr-sized differences of single elements."""
    twin = v_twin(tiny_pipe)
    base = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    cfg = EraseConfig(concepts=["church"], lr=1e-3, iterations=5, num_steps=10, start_step=3)
    g_eps, eps_run = first_gradients(tiny_pipe, cfg, monkeypatch)
    g_v, v_run = first_gradients(twin, cfg, monkeypatch)
    assert eps_run.record["loss_space"] == v_run.record["loss_space"] == "epsilon"
    a, b = torch.tensor(eps_run.losses), torch.tensor(v_run.losses)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-9), (a - b).abs().max()
    assert ((g_eps - g_v).norm() / g_eps.norm()).item() < 1e-5
    d_eps = torch.cat([(t - base[n]).flatten() for n, t in eps_run.tensors.items()])
    d_v = torch.cat([(v_run.tensors[n] - base[n]).flatten() for n in eps_run.tensors])
    assert ((d_eps - d_v).norm() / d_eps.norm()).item() < 1e-4
    # in the model's own space the v twin's loss is larger: v reweights the steps by ~1/abar_t
    model_space = erase(v_twin(tiny_pipe), replace(cfg, loss_space="model"), progress=False)
    assert model_space.record["loss_space"] == "v_prediction"
    assert model_space.losses[0] > 2 * eps_run.losses[0]


def test_a_walk_looks_up_the_network_dtype_once(tiny_pipe, monkeypatch):
    """diffusers' ``dtype`` property walks every submodule; a sampler asks it once per network,
    and a new sampler asks again (a network converted in between is seen)."""
    from diffusers.models.modeling_utils import ModelMixin

    family = family_of(tiny_pipe)
    lookups, prop = [], ModelMixin.dtype
    monkeypatch.setattr(ModelMixin, "dtype", property(lambda m: lookups.append(1) or prop.fget(m)))
    cond = family.encode(tiny_pipe, ["church"])
    sampler = family.sampler(tiny_pipe, 4)
    x = sampler.noise(0)
    for s in range(3):
        out = sampler.raw(tiny_pipe.unet, x, s, cond)
    assert len(lookups) == 1 and out.dtype == torch.float32
    tiny_pipe.unet.to(torch.bfloat16)
    fresh = family.sampler(tiny_pipe, 4)
    assert fresh.network_dtype(tiny_pipe.unet) == torch.bfloat16 and len(lookups) == 2


def test_the_timestep_tensor_is_the_one_diffusers_makes(tiny_pipe):
    """raw passes each int timestep as a [1] int64 tensor (so a record keeps it an input); the
    UNet's output is bit for bit the one it gives for the plain int, at every step."""
    family = family_of(tiny_pipe)
    sampler = family.sampler(tiny_pipe, 6)
    cond = family.encode(tiny_pipe, ["a church"])
    x = sampler.noise(3)
    net = tiny_pipe.unet
    with torch.no_grad():
        for s, t in enumerate(sampler.timesteps):
            own = net(x, int(t), encoder_hidden_states=cond["encoder_hidden_states"]).sample
            assert torch.equal(sampler.raw(net, x, s, cond), own.float())
