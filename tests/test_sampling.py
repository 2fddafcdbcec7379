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
