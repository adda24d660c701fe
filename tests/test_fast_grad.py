"""The faster CPU input gradient of small-channel convolutions equals autograd's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advtrain.attacks.fast_grad import fast_input_gradients


def _input_gradient(x, weight, bias, stride, padding, fast: bool):
    x = x.clone().requires_grad_(True)
    probe = torch.linspace(-1, 1, 7, dtype=x.dtype)
    if fast:
        with fast_input_gradients():
            out = F.conv2d(x, weight, bias, stride, padding)
    else:
        out = F.conv2d(x, weight, bias, stride, padding)
    # a non-uniform upstream gradient, so every tap's weight shows in the result
    loss = (out * probe.repeat(out.numel() // 7 + 1)[: out.numel()].reshape(out.shape)).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return out, grad


@pytest.mark.parametrize(
    "channels, kernel, stride, padding, size",
    [
        (1, 4, 2, 1, (28, 28)),  # the fast-adversarial MNIST CNN's first layer
        (1, 5, 1, 2, (28, 28)),  # Madry et al.'s
        (3, 3, 1, 1, (9, 11)),  # colour, odd sizes
        (3, 3, 2, 0, (10, 10)),  # the last row and column never reached by the kernel
        (2, (3, 5), (3, 2), (2, 1), (13, 8)),  # rectangular everything
        (4, 1, 1, 0, (5, 5)),
    ],
)
def test_fast_input_gradient_equals_autograd(channels, kernel, stride, padding, size):
    g = torch.Generator().manual_seed(0)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.rand(6, channels, *size, generator=g, dtype=torch.float64)
    weight = torch.randn(5, channels, kh, kw, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    out_fast, grad_fast = _input_gradient(x, weight, bias, stride, padding, fast=True)
    out, grad = _input_gradient(x, weight, bias, stride, padding, fast=False)
    assert out_fast.grad_fn is not None and "ConvInputGrad" in type(out_fast.grad_fn).__name__
    assert torch.equal(out_fast, out)
    assert grad_fast.shape == x.shape and grad_fast.is_contiguous()
    torch.testing.assert_close(grad_fast, grad, rtol=1e-12, atol=1e-12)


def test_convolutions_that_train_or_have_many_channels_are_left_alone():
    x = torch.rand(2, 8, 6, 6, requires_grad=True)
    weight = torch.randn(4, 8, 3, 3)
    with fast_input_gradients():
        wide = F.conv2d(x, weight)
        trained = F.conv2d(x[:, :1], torch.randn(4, 1, 3, 3, requires_grad=True))
    for out in (wide, trained):
        assert "ConvInputGrad" not in type(out.grad_fn).__name__


def _fast_mode_in_force() -> bool:
    from advtrain.attacks.fast_grad import _FastInputGradMode, _mode_stack

    return any(isinstance(mode, _FastInputGradMode) for mode in _mode_stack())


def test_frozen_installs_the_fast_gradient_on_the_cpu_only():
    """The speed-up is a strategy chosen by the model's device: on the CPU ``frozen`` installs it,
    on any other device (here the meta device) no torch-function mode is pushed at all."""
    from advtrain.attacks import frozen
    from advtrain.attacks.fast_grad import input_gradient_speedup

    cpu_model = torch.nn.Conv2d(1, 2, 3)
    with frozen(cpu_model):
        assert _fast_mode_in_force()
    assert not _fast_mode_in_force()
    meta_model = torch.nn.Conv2d(1, 2, 3, device="meta")
    with frozen(meta_model):
        assert not _fast_mode_in_force()
    with input_gradient_speedup(torch.device("cuda")):
        assert not _fast_mode_in_force()


def test_an_attack_on_another_device_runs_without_the_mode(monkeypatch):
    """An attack whose model is not on the CPU (the device check patched to say so) takes its
    gradients without the fast-gradient mode."""
    import advtrain.attacks.base as base
    from advtrain.attacks import PGD

    seen = []
    real = base.input_gradient_speedup

    def spy(device):
        seen.append(device)
        return real(torch.device("cuda")) if device.type == "cpu" else real(device)

    monkeypatch.setattr(base, "input_gradient_speedup", spy)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    in_force = []
    original = model.forward

    def forward(x):
        in_force.append(_fast_mode_in_force())
        return original(x)

    model.forward = forward
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    PGD(eps=0.1, steps=2, seed=0)(model, x, y)
    assert seen and in_force and not any(in_force)
