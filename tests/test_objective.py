import torch

from kscu.families import family_of
from kscu.objective import kscu_loss


def test_sd_lambda1_matches_the_method(tiny_pipe):
    sampler = family_of(tiny_pipe).sampler(tiny_pipe, 50)
    assert sampler.timesteps[14] == 701 and sampler.timesteps[49] == 1
    assert abs(sampler.lambda1(14, 2e-5) - 0.00598) < 1e-12
    assert abs(sampler.lambda1(49, 2e-5) - 0.01998) < 1e-12


def test_loss_equals_hand_computation():
    p = torch.tensor([1.0, 2.0])
    n = torch.tensor([0.5, 1.0])
    e = torch.tensor([0.0, 0.0])
    u = torch.tensor([1.0, 1.0])
    # target_erase = n - 1 * (p - n) = [0.0, 0.0]  -> MSE(e, .) = 0
    # lambda1 at t=501: (1000 - 501) * 2e-5 = 0.00998
    # target_leak = n - 0.00998 * (p - n) = [0.49501, 0.99002]
    # MSE(u, target_leak) = ((0.50499)^2 + (0.00998)^2) / 2
    expected_leak = (0.50499**2 + 0.00998**2) / 2
    loss = kscu_loss(e, u, p, n, eta=1.0, lambda1=0.00998, lambda2=1e-4)
    assert abs(loss.item() - 1e-4 * expected_leak) < 1e-10

    e2 = torch.tensor([1.0, -1.0])  # erase term: ((1-0)^2 + (-1-0)^2) / 2 = 1
    loss2 = kscu_loss(e2, u, p, n, eta=1.0, lambda1=0.00998, lambda2=1e-4)
    assert abs(loss2.item() - (1.0 + 1e-4 * expected_leak)) < 1e-7


def test_lambda2_zero_is_esd():
    g = torch.Generator().manual_seed(0)
    e, u, p, n = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(4))
    esd = torch.nn.functional.mse_loss(e, n - 1.0 * (p - n))
    assert torch.equal(kscu_loss(e, None, p, n, 1.0, 0.014, 0.0), esd)
    assert torch.equal(kscu_loss(e, u, p, n, 1.0, 0.014, 0.0), esd)
    eta2 = torch.nn.functional.mse_loss(e, n - 2.0 * (p - n))
    assert torch.allclose(kscu_loss(e, None, p, n, 2.0, 0.014, 0.0), eta2)


def test_loss_is_float32_even_for_bf16_inputs():
    x = torch.ones(2, dtype=torch.bfloat16)
    assert kscu_loss(x, x, x, x, 1.0, 0.02, 1e-4).dtype == torch.float32
