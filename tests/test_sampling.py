import torch

from kscu.sampling import sample_images


def test_sampling_runs_in_inference_mode_and_returns_an_ordinary_tensor(tiny_pipe):
    """Every denoiser call of the sampling walk skips autograd's bookkeeping (inference mode);
    the images it returns are an ordinary tensor the caller may change in place. The walk's
    values are the pipeline's own (tests/families/test_sdxl.py, test_flux.py)."""
    modes = []
    hook = tiny_pipe.unet.register_forward_pre_hook(
        lambda *_: modes.append(torch.is_inference_mode_enabled())
    )
    images = sample_images(tiny_pipe, ["a church", "a cat"], [1, 2], steps=3, guidance=5.0)
    hook.remove()
    assert modes == [True] * 3
    assert images.shape[0] == 2 and not images.is_inference()
    images.mul_(0.5)


def test_sampling_replays_its_denoiser_calls_with_the_same_values(tiny_pipe, replay_log):
    """On a CPU in float32 the walk's calls are replayed from records (kscu.tracing), one per
    batch shape: the first call of each runs through Python and is recorded, the second is
    replayed and checked against Python, the rest are replayed. The images are the ones calls
    through Python make, bit for bit."""
    recorded, through_python = replay_log.recorded, replay_log.through_python
    args = (tiny_pipe, ["a church", "a cat", "a dog"], [1, 2, 3], 4, 5.0)
    replayed = sample_images(*args, batch_size=2)
    assert len(recorded) == 2 and None not in recorded  # CFG rows 4 and 2
    assert len(through_python) == 2 * 2  # of 2 x 4 calls
    assert torch.equal(replayed, sample_images(*args, batch_size=2, replay=False))
    assert len(through_python) == 4 and len(recorded) == 2  # replay=False: plain calls
