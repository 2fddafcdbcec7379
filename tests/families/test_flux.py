"""The FLUX.1 family (KSCU_METHOD.md section 9) on tiny FLUX.1-dev and FLUX.1-schnell stand-ins.

Ground truth is diffusers' own FluxPipeline: its timesteps, sigmas, shift, prompt encoding and
sampling walk; the transformer called by hand for the loss.
"""

import json

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from kscu.allocator import LABELS, glibc
from kscu.checkpoint import WEIGHTS
from kscu.config import EraseConfig, resolve
from kscu.errors import KscuError
from kscu.families import get_family
from kscu.families.flux import FlowSampler
from kscu.objective import kscu_loss
from kscu.runner import erase_to_folder
from kscu.sampling import sample_images
from kscu.scope import trainable_names
from kscu.trainer import build_schedule, erase

FLUX = get_family("flux")
SHORT = dict(num_steps=6, start_step=3, resolution=32, max_sequence_length=16)
# FLUX's CPU default returns freed memory, and in this process torch made tensors long before an
# erase could ask for huge pages: the warning that says so is tested in tests/test_allocator.py
pytestmark = pytest.mark.filterwarnings("ignore:freed memory is returned to the system")
# The Linear layers of the attn scope, written out (notes section 4): 8 per joint block, 3 per
# single block; not the RMSNorms under attn, not the single block's proj_out (attn + MLP).
JOINT = "to_q to_k to_v to_out.0 add_q_proj add_k_proj add_v_proj to_add_out".split()
BLOCKS = {"transformer_blocks.0": JOINT, "single_transformer_blocks.0": JOINT[:3]}
ATTN_SCOPE = {
    f"{block}.attn.{layer}.{kind}"
    for block, layers in BLOCKS.items()
    for layer in layers
    for kind in ("weight", "bias")
}


@pytest.fixture(params=["flux", "schnell"])
def pipe(request):
    """FLUX.1-dev (guidance embedding) and FLUX.1-schnell (none) stand-ins, fresh copies."""
    return request.getfixturevalue(f"{request.param}_pipe")


def pipeline_schedule(pipe, steps: int, size: int):
    """FluxPipeline's own timesteps and sigmas for this size: one real call, stopped after its
    first step (the scheduler is set before the loop). Also returns the packed token count."""

    def stop(p, i, t, kwargs):
        p._interrupt = True
        return kwargs

    out = pipe(
        "a church",
        num_inference_steps=steps,
        height=size,
        width=size,
        max_sequence_length=16,
        output_type="latent",
        callback_on_step_end=stop,
    ).images
    return pipe.scheduler.timesteps.clone(), pipe.scheduler.sigmas.clone(), out.shape[1]


def predict(pipe, x, s, prompt, steps=SHORT["num_steps"], size=SHORT["resolution"]):
    """The transformer's velocity at x_s, called as FluxPipeline calls it (section 3.4)."""
    timesteps, _, tokens = pipeline_schedule(pipe, steps, size)
    seq, pooled, text_ids = pipe.encode_prompt(prompt, max_sequence_length=16, device="cpu")
    half = int(tokens**0.5)
    img_ids = pipe._prepare_latent_image_ids(1, half, half, "cpu", torch.float32)
    embedded = pipe.transformer.config.guidance_embeds
    return pipe.transformer(
        hidden_states=x,
        timestep=timesteps[s].expand(1) / 1000,
        guidance=torch.full([1], 3.5) if embedded else None,
        pooled_projections=pooled,
        encoder_hidden_states=seq,
        txt_ids=text_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]


@pytest.mark.parametrize(
    "mode, start, iterations",
    [("nudity", 8, 750), ("class", 8, 750), ("style", 14, 500), ("instance", 22, 200)],
)
def test_defaults_table(mode, start, iterations):
    cfg = resolve(EraseConfig(concepts=["x"], mode=mode), family=FLUX)
    assert (cfg.start_step, cfg.iterations, cfg.scope) == (start, iterations, "attn")
    assert (cfg.num_steps, cfg.end_step, cfg.lr, cfg.trajectory_guidance) == (28, 28, 1e-4, 3.5)
    assert (cfg.loss_space, cfg.max_sequence_length, cfg.lambda2) == ("model", 512, 1e-4)
    assert (cfg.lambda1_alpha, cfg.family) == (2e-5, "flux")
    esd = resolve(EraseConfig(concepts=["x"], mode=mode, method="esd"), family=FLUX)
    assert (esd.start_step, esd.lambda2, esd.lr, esd.augment) == (0, 0.0, 1e-4, False)
    assert cfg.reuse_freed_memory is False  # a CPU's freed blocks returned (README, Memory)
    mine = EraseConfig(concepts=["x"], mode=mode, lr=3e-5, num_steps=40, reuse_freed_memory=True)
    mine = resolve(mine, family=FLUX)
    assert (mine.lr, mine.end_step) == (3e-5, 40)  # the user's value wins over the family's
    assert mine.reuse_freed_memory is True


def test_key_steps_cap_at_25_of_28():
    cfg = resolve(EraseConfig(concepts=["x"], start_step=22, loops=1, iterations=60), family=FLUX)
    starts = [s for _, s in build_schedule(cfg)]
    assert starts[:6] == [22, 23, 24, 25, 26, 27] and min(starts[:15]) == 22
    assert min(starts[15:]) == 25  # runs 22.., 23.., 24.., then 25.. forever (ceil(0.9*28)-1)


def test_sd_scopes_are_refused():
    with pytest.raises(KscuError, match="unknown scope 'xattn' for flux; choose one of full, attn"):
        resolve(EraseConfig(concepts=["x"], scope="xattn"), family=FLUX)


@pytest.mark.parametrize("size, steps", [(32, 28), (512, 28), (48, 3)])
def test_sampler_steps_are_the_pipeline_s_own(pipe, size, steps):
    """Timesteps and sigmas equal FluxPipeline's for the same size; mu from the packed length."""
    sampler = FLUX.sampler(pipe, steps, size)
    timesteps, sigmas, tokens = pipeline_schedule(pipe, steps, size)
    assert sampler.timesteps == timesteps.tolist()
    assert sampler.sigmas == sigmas.tolist() and sampler.sigmas[-1] == 0
    assert tokens == (size // 16) ** 2
    cfg = pipe.scheduler.config
    mu = calculate_shift(
        tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
    )
    assert sampler.mu == pytest.approx(mu, rel=1e-12, abs=1e-15)
    if not cfg.use_dynamic_shifting:  # schnell: the plain linspace, no shift
        assert np.allclose(sampler.sigmas[:-1], np.linspace(1, 1 / steps, steps))


def test_lambda1_is_one_minus_sigma_at_the_key_steps(flux_pipe):
    """At the 512 px training default (mu 0.63): (1 - sigma_s) * 0.02 (notes section 3.3)."""
    sampler = FLUX.sampler(flux_pipe, 28)
    assert (sampler.resolution, FLUX.native_resolution(flux_pipe)) == (512, 1024)
    assert sampler.mu == pytest.approx(0.63)
    for s, sigma, lambda1 in [(8, 0.8244, 0.00351), (14, 0.6525, 0.00695), (22, 0.3387, 0.01323)]:
        assert sampler.sigmas[s] == pytest.approx(sigma, abs=5e-5)
        assert sampler.lambda1(s, 2e-5) == pytest.approx((1 - sampler.sigmas[s]) * 0.02, rel=1e-9)
        assert sampler.lambda1(s, 2e-5) == pytest.approx(lambda1, abs=5e-6)


def test_long_prompts_are_counted_by_t5s_limit(flux_pipe):
    """The sequence the transformer reads is T5's, cut at 512 tokens; CLIP's 77 (its pooled
    vector only) does not decide which prompts ``kscu generate`` notes as cut."""
    clip_long = " ".join(["a"] * 100)  # over CLIP's 77, well under T5's 512 tokens
    t5 = flux_pipe.tokenizer_2([clip_long], truncation=False).input_ids[0]
    assert len(t5) < 512
    words = " ".join(["a"] * 600)
    assert FLUX.long_prompts(flux_pipe, ["a church", clip_long, words]) == ([2], 512)


def test_prompts_are_encoded_as_the_pipeline_does(flux_pipe):
    """CLIP pooled + T5 sequence; max_sequence_length is part of the conditioning (no mask)."""
    for prompt in ("a photo of a church", ""):
        with torch.no_grad():  # as inside pipe(...): T5 takes other kernels with autograd on
            seq, pooled, _ = flux_pipe.encode_prompt(prompt, max_sequence_length=16, device="cpu")
        cond = FLUX.encode(flux_pipe, [prompt], 16)
        assert torch.equal(cond["encoder_hidden_states"], seq)
        assert torch.equal(cond["pooled_projections"], pooled)
    assert FLUX.encode(flux_pipe, ["a"])["encoder_hidden_states"].shape[1] == 512  # default
    sampler = FLUX.sampler(flux_pipe, 6, 32)
    x = sampler.noise(0)
    with torch.no_grad():
        v16, v32 = (
            sampler.raw(flux_pipe.transformer, x, 2, FLUX.encode(flux_pipe, ["church"], n))
            for n in (16, 32)
        )
    assert not torch.allclose(v16, v32)
    with pytest.raises(KscuError, match="max-sequence-length"):
        FLUX.encode(flux_pipe, ["church"], 0)


def test_sampling_walk_is_the_pipeline_s_own(pipe, monkeypatch):
    """sample_images' latents equal FluxPipeline's, one seed per image; decoding as it does."""
    prompts, seeds = ["a photo of a church", "a cat"], [3, 4]
    own = pipe(
        prompts,
        num_inference_steps=3,
        height=32,
        width=32,
        guidance_scale=3.5,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    ).images
    with monkeypatch.context() as m:
        m.setattr(FlowSampler, "decode", lambda self, pipe, x: x)
        mine = sample_images(pipe, prompts, seeds, steps=3, guidance=3.5, resolution=32)
    assert torch.equal(mine, own), (mine - own).abs().max()
    image = pipe(
        prompts[0],
        num_inference_steps=3,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    decoded = FLUX.sampler(pipe, 3, 32).decode(pipe, own[:1])
    assert torch.allclose(decoded, image, atol=1e-6)


def test_loss_on_fixed_tensors(flux_pipe, hand_loss):
    g = torch.Generator().manual_seed(0)
    p, n, e, u = (torch.randn(1, 1024, 64, generator=g) for _ in range(4))
    lambda1 = FLUX.sampler(flux_pipe, 28, 512).lambda1(14, 2e-5)
    got = kscu_loss(e, u, p, n, eta=1.0, lambda1=lambda1, lambda2=1e-4)
    assert got.item() == pytest.approx(hand_loss(p, n, e, u, lambda1).item(), rel=1e-6)
    assert got.item() != pytest.approx(hand_loss(p, n, e, u, 0.02).item(), rel=1e-9)


def test_erase_loss_is_the_objective_by_hand(pipe, loss_by_hand):
    """p, n, e, u are transformer calls at guidance 3.5 (none for schnell); lambda1 from sigma."""
    cfg = EraseConfig(concepts=["church"], iterations=2, lr=1e-3, augment=False, **SHORT)
    _, sigmas, _ = pipeline_schedule(pipe, cfg.num_steps, cfg.resolution)
    got, hand = loss_by_hand(pipe, cfg, predict, lambda s: (1 - sigmas[s].item()) * 0.02)
    assert got == pytest.approx(hand, rel=1e-5)


def test_reused_trajectory_is_a_walk_from_noise(pipe, check_reuse):
    check_reuse(pipe, EraseConfig(concepts=["church"], **SHORT))


def test_only_the_attention_projections_change(pipe, changed_by_erase):
    cfg = EraseConfig(concepts=["church"], lr=1e-3, iterations=3, **SHORT)
    assert changed_by_erase(pipe, cfg) == ATTN_SCOPE
    assert set(trainable_names(pipe.transformer, "attn", FLUX)) == ATTN_SCOPE


def test_same_seed_same_weights(flux_pipe, check_same_seed):
    check_same_seed(flux_pipe, EraseConfig(concepts=["church"], lr=1e-3, iterations=4, **SHORT))


@pytest.mark.parametrize("variant", ["flux", "schnell"])
def test_save_then_load_reproduces_outputs_bit_for_bit(variant, check_save_load):
    """Erase from a saved folder, load that folder again and the run: the same transformer."""
    steps = dict(num_steps=4, start_step=1) if variant == "schnell" else {}
    cfg = EraseConfig(concepts=["church"], lr=1e-3, iterations=3, **{**SHORT, **steps})

    def outputs(p):
        sampler = FLUX.sampler(p, cfg.num_steps, 32)
        x = torch.cat([sampler.noise(1), sampler.noise(2)])
        with torch.no_grad():
            return sampler.raw(p.transformer, x, 2, FLUX.encode(p, ["church", "a cat"], 16))

    meta = check_save_load(variant, cfg, outputs)
    assert meta["family"] == "flux" and meta["config"]["max_sequence_length"] == 16


def test_checkpoint_keys_are_the_transformer_s_names(run_dir):
    from safetensors.torch import load_file

    tensors = load_file(str(run_dir("flux") / WEIGHTS))
    meta = json.loads((run_dir("flux") / "kscu.json").read_text())
    if glibc() is not None and meta["device"] == "cpu":  # FLUX's default: freed blocks returned
        assert meta["host_allocator"] == LABELS[False]
    assert set(tensors) == ATTN_SCOPE
    assert "transformer_blocks.0.attn.to_q.weight" in tensors
    assert "single_transformer_blocks.0.proj_out.weight" not in tensors
    assert all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize("reuse, asked", [(None, True), (True, False)])
def test_a_cpu_erase_asks_for_huge_pages_around_the_load_unless_memory_is_kept(
    model_dir, tmp_path, huge_page_requests, reuse, asked
):
    """FLUX's default on a CPU returns freed memory, so the runner asks torch for huge pages
    before the model loads and stops asking after it; with freed memory kept it asks nothing."""
    cfg = EraseConfig(
        concepts=["church"], iterations=1, device="cpu", reuse_freed_memory=reuse, **SHORT
    )
    erase_to_folder(cfg, str(model_dir("flux")), tmp_path / "run", progress=False)
    asking = asked and glibc() is not None  # only where kscu returns freed memory
    assert huge_page_requests == (["ask", "asked"] if asking else [])
    meta = json.loads((tmp_path / "run" / "kscu.json").read_text())
    assert meta["config"]["reuse_freed_memory"] is not asked


@pytest.mark.parametrize(
    "variant, message",
    [
        ("sd", "erased from a sd model, but this pipeline is flux; load a sd base model"),
        ("sdxl", "erased from a sdxl model, but this pipeline is flux; load a sdxl base model"),
        ("schnell", "erased from base model"),  # same family, another base: the fingerprint
    ],
)
def test_a_checkpoint_of_another_family_or_base_is_refused(
    variant, message, run_dir, flux_pipe, refused
):
    assert message in refused(flux_pipe, run_dir(variant))


def test_bf16_compute_keeps_float32_exact_updates(flux_pipe):
    """lr = 1e-5 is below half a bf16 ulp of most weights: the float32 masters keep every step
    (KSCU_METHOD.md section 8); the caller's transformer stays bf16."""
    pipe = flux_pipe.to(dtype=torch.bfloat16)
    names = trainable_names(pipe.transformer, "attn", FLUX)
    params = dict(pipe.transformer.named_parameters())
    before = {n: params[n].detach().float().clone() for n in names}
    masters = []

    def callback(i, entry, x, loss):
        masters.append({params[n].dtype for n in names})

    cfg = EraseConfig(concepts=["church"], dtype="bfloat16", iterations=3, lr=1e-5, **SHORT)
    result = erase(pipe, cfg, progress=False, callback=callback)
    assert masters == [{torch.float32}] * 3
    total = sum(before[n].numel() for n in names)
    changed = sum((result.tensors[n] != before[n]).sum().item() for n in names) / total
    assert changed >= 0.999, changed
    lost = sum((result.tensors[n].bfloat16().float() == before[n]).sum().item() for n in names)
    assert lost / total > 0.5  # what bf16 weights would have kept: mostly nothing
    assert all(p.dtype == torch.bfloat16 for p in pipe.transformer.parameters())
