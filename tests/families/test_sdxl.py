"""The SDXL family: the SD recipe with SDXL's conditioning (KSCU_METHOD.md section 9).

Ground truth is diffusers' own StableDiffusionXLPipeline: its prompt encoding (zeros for the
empty prompt), time_ids and sampling walk, with DDIM made from the Euler config SDXL ships.
"""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from kscu.config import EraseConfig, resolve
from kscu.families import get_family
from kscu.families.sd import DDIMSampler
from kscu.objective import kscu_loss
from kscu.sampling import sample_images
from kscu.scope import trainable_names

SDXL, SD = get_family("sdxl"), get_family("sd")
SD_50 = [981 - 20 * s for s in range(50)]
SHORT = dict(num_steps=6, start_step=3, resolution=32)


def release_ddim(pipe, steps: int):
    """DDIM from the shipped Euler config: SD's DDIM, because the release carries clip_sample
    false and set_alpha_to_one false (notes section 1)."""
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(steps)
    return ddim


def time_ids(pipe, size: int) -> torch.Tensor:
    return pipe._get_add_time_ids(
        (size, size),
        (0, 0),
        (size, size),
        dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )


def predict(pipe, x, s, prompt, steps=SHORT["num_steps"], size=SHORT["resolution"]):
    """The UNet's epsilon at x_s, called as the SDXL pipeline calls it (section 2.3); "" is the
    pipeline's own unconditional branch (zeros: force_zeros_for_empty_prompt)."""
    embeds, zeros, pooled, zeros_pooled = pipe.encode_prompt(
        prompt or "a", device="cpu", do_classifier_free_guidance=True
    )
    if prompt == "":
        embeds, pooled = zeros, zeros_pooled
    return pipe.unet(
        x,
        release_ddim(pipe, steps).timesteps[s],
        encoder_hidden_states=embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids(pipe, size)},
        return_dict=False,
    )[0]


@pytest.mark.parametrize("mode", ["nudity", "class", "style", "instance"])
def test_defaults_table_is_sd_s(mode):
    cfg = resolve(EraseConfig(concepts=["x"], mode=mode), family=SDXL)
    sd = resolve(EraseConfig(concepts=["x"], mode=mode), family=SD)
    assert cfg.family == "sdxl"
    assert {**cfg.to_dict(), "family": "sd"} == sd.to_dict()
    assert (cfg.num_steps, cfg.lr, cfg.trajectory_guidance, cfg.loss_space) == (
        50,
        1e-5,
        3.0,
        "epsilon",
    )


def test_sampler_is_sd_s_ddim_pinned_from_the_shipped_euler(sdxl_pipe):
    assert isinstance(sdxl_pipe.scheduler, EulerDiscreteScheduler)
    sampler = SDXL.sampler(sdxl_pipe, 50)
    assert sampler.timesteps == SD_50
    assert torch.equal(sampler.scheduler.betas, sdxl_pipe.scheduler.betas)
    assert not sampler.scheduler.config.clip_sample
    assert not sampler.scheduler.config.set_alpha_to_one
    assert SDXL.sampler(sdxl_pipe, 6).timesteps == release_ddim(sdxl_pipe, 6).timesteps.tolist()
    assert isinstance(sdxl_pipe.scheduler, EulerDiscreteScheduler)  # the pipeline's untouched
    # a model config with other spacing does not move the steps
    sdxl_pipe.scheduler = EulerDiscreteScheduler.from_config(
        sdxl_pipe.scheduler.config, timestep_spacing="trailing"
    )
    assert SDXL.sampler(sdxl_pipe, 50).timesteps == SD_50
    assert (SDXL.eval_steps, SDXL.eval_guidance) == (50, 5.0)


@pytest.mark.parametrize("size", [64, 32])
def test_time_ids_are_the_pipeline_s(sdxl_pipe, size):
    """(R, R, 0, 0, R, R) at the training resolution, one row per batch row; native R = 64."""
    assert SDXL.sampler(sdxl_pipe, 6).resolution == 64 == SDXL.native_resolution(sdxl_pipe)
    cond = SDXL.encode(sdxl_pipe, ["a church", "a cat"])
    added = SDXL.unet_kwargs(cond, 2, size)["added_cond_kwargs"]
    assert torch.equal(added["time_ids"], time_ids(sdxl_pipe, size).expand(2, 6))
    assert added["time_ids"][0].tolist() == [size, size, 0, 0, size, size]


def test_prompts_and_the_zero_unconditional_are_the_pipeline_s(sdxl_pipe):
    with torch.no_grad():
        embeds, zeros, pooled, zeros_pooled = sdxl_pipe.encode_prompt("a church", device="cpu")
    cond, uncond = SDXL.encode(sdxl_pipe, ["a church"]), SDXL.encode(sdxl_pipe, [""])
    assert torch.equal(cond["encoder_hidden_states"], embeds)
    assert torch.equal(cond["text_embeds"], pooled)
    assert torch.equal(uncond["encoder_hidden_states"], zeros) and not zeros.any()
    assert torch.equal(uncond["text_embeds"], zeros_pooled) and not zeros_pooled.any()
    mixed = SDXL.encode(sdxl_pipe, ["", "a church"])  # only the empty row is zeroed
    assert not mixed["text_embeds"][0].any() and mixed["text_embeds"][1].any()
    assert SDXL.sampler(sdxl_pipe, 6).record()["unconditional"] == "zeros"
    # without the flag the pipeline's unconditional is the encoding of "", and so is kscu's
    sdxl_pipe.register_to_config(force_zeros_for_empty_prompt=False)
    with torch.no_grad():
        empty, _, empty_pooled, _ = sdxl_pipe.encode_prompt(
            "", device="cpu", do_classifier_free_guidance=False
        )
    uncond = SDXL.encode(sdxl_pipe, [""])
    assert empty.any() and torch.equal(uncond["encoder_hidden_states"], empty)
    assert torch.equal(uncond["text_embeds"], empty_pooled)
    assert SDXL.sampler(sdxl_pipe, 6).record()["unconditional"] == 'the encoding of ""'


@pytest.mark.parametrize("size", [64, 32])
def test_sampling_walk_is_the_pipeline_s_own(sdxl_pipe, size, monkeypatch):
    """sample_images' latents equal the pipeline's with DDIM and negative_prompt=None (zeros)."""
    prompts, seeds = ["a photo of a church", "a cat"], [3, 4]
    sdxl_pipe.scheduler = DDIMScheduler.from_config(sdxl_pipe.scheduler.config)
    own = sdxl_pipe(
        prompts,
        num_inference_steps=3,
        height=size,
        width=size,
        guidance_scale=5.0,
        negative_prompt=None,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    ).images
    with monkeypatch.context() as m:
        m.setattr(DDIMSampler, "decode", lambda self, pipe, x: x)
        mine = sample_images(sdxl_pipe, prompts, seeds, steps=3, guidance=5.0, resolution=size)
    assert torch.equal(mine, own), (mine - own).abs().max()


def test_loss_on_fixed_tensors(sdxl_pipe, hand_loss):
    g = torch.Generator().manual_seed(0)
    p, n, e, u = (torch.randn(1, 4, 128, 128, generator=g) for _ in range(4))
    sampler = SDXL.sampler(sdxl_pipe, 50)
    lambda1 = sampler.lambda1(14, 2e-5)
    assert sampler.timesteps[14] == 701 and lambda1 == pytest.approx(299 * 2e-5, rel=1e-12)
    got = kscu_loss(e, u, p, n, eta=1.0, lambda1=lambda1, lambda2=1e-4)
    assert got.item() == pytest.approx(hand_loss(p, n, e, u, lambda1).item(), rel=1e-6)


def test_erase_loss_is_the_objective_by_hand(sdxl_pipe, loss_by_hand):
    """p, n, e, u are UNet calls with both encoders, the pooled embedding and time_ids at the
    training resolution; n and u on the zero unconditional; lambda1 = (1000 - t) * 2e-5."""
    cfg = EraseConfig(concepts=["church"], iterations=2, lr=1e-3, augment=False, **SHORT)
    timesteps = release_ddim(sdxl_pipe, cfg.num_steps).timesteps
    got, hand = loss_by_hand(sdxl_pipe, cfg, predict, lambda s: (1000 - timesteps[s]) * 2e-5)
    assert got == pytest.approx(hand, rel=1e-5)


def test_reused_trajectory_is_a_walk_from_noise(sdxl_pipe, check_reuse):
    check_reuse(sdxl_pipe, EraseConfig(concepts=["church"], **SHORT))


def scope_by_hand(unet, scope: str) -> set[str]:
    """The SD scopes written out: Linear (and, for noxattn, Conv2d) layers by attn1/attn2."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if scope == "noxattn" else (torch.nn.Linear,)
    keep = {
        "xattn": lambda name: ".attn2." in name + ".",
        "noxattn": lambda name: ".attn2." not in name + ".",
        "selfattn": lambda name: ".attn1." in name + ".",
    }[scope]
    return {
        f"{name}.{p}"
        for name, module in unet.named_modules()
        if isinstance(module, kinds) and keep(name)
        for p, _ in module.named_parameters(recurse=False)
    }


@pytest.mark.parametrize("scope", ["xattn", "noxattn", "selfattn"])
def test_only_the_scope_changes(sdxl_pipe, scope, changed_by_erase):
    expected = scope_by_hand(sdxl_pipe.unet, scope)
    cfg = EraseConfig(concepts=["church"], scope=scope, lr=1e-3, iterations=3, **SHORT)
    assert changed_by_erase(sdxl_pipe, cfg) == expected
    deep = "down_blocks.1.attentions.0.transformer_blocks.1"  # SDXL's second layer of a block
    assert {"xattn": f"{deep}.attn2.to_k.weight", "selfattn": f"{deep}.attn1.to_q.weight"}.get(
        scope, "add_embedding.linear_1.weight"
    ) in expected


def test_same_seed_same_weights(sdxl_pipe, check_same_seed):
    check_same_seed(sdxl_pipe, EraseConfig(concepts=["church"], lr=1e-3, iterations=4, **SHORT))


def test_save_then_load_reproduces_outputs_bit_for_bit(sdxl_pipe, check_save_load):
    cfg = EraseConfig(concepts=["church"], lr=1e-3, iterations=3, **SHORT)

    def outputs(p):
        sampler = SDXL.sampler(p, cfg.num_steps, 32)
        x = torch.cat([sampler.noise(1), sampler.noise(2)])
        with torch.no_grad():
            return sampler.raw(p.unet, x, 2, SDXL.encode(p, ["church", ""]))

    meta = check_save_load("sdxl", cfg, outputs)
    assert meta["family"] == "sdxl" and meta["unconditional"] == "zeros"
    assert meta["resolution"] == 32
    assert meta["timesteps"] == release_ddim(sdxl_pipe, 6).timesteps.tolist()  # 831, ..., 1


def test_checkpoint_keys_are_the_unet_s_names(run_dir, sdxl_pipe):
    from safetensors.torch import load_file

    tensors = load_file(str(run_dir("sdxl") / "weights.safetensors"))
    assert set(tensors) == set(trainable_names(sdxl_pipe.unet, "noxattn", SDXL))  # class mode
    assert set(tensors) == scope_by_hand(sdxl_pipe.unet, "noxattn")
    assert "down_blocks.0.resnets.0.conv1.weight" in tensors


@pytest.mark.parametrize("variant", ["sd", "flux"])
def test_a_checkpoint_of_another_family_is_refused(variant, run_dir, sdxl_pipe, refused):
    message = refused(sdxl_pipe, run_dir(variant))
    assert f"erased from a {variant} model, but this pipeline is sdxl" in message
