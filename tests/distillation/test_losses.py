import math

import pytest
import torch
import torch.nn.functional as F

from lightning_compress.distillation.losses import (
    combined_loss,
    distillation_loss,
    scheduled_alpha,
    top1_agreement,
)


def test_distillation_loss_matches_definition():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    temp = 3.0
    p_t, p_s = torch.softmax(t / temp, 1), torch.softmax(s / temp, 1)
    expected = temp**2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert distillation_loss(s, t, temp).item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_loss_zero_iff_equal_and_gradient_only_to_student():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    assert distillation_loss(s.detach(), s.detach(), 2.0).item() == pytest.approx(0.0, abs=1e-7)
    distillation_loss(s, t, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_t_squared_keeps_gradient_scale():
    # At high T the gradient of T^2 KL tends to (s - t)/N/C-independent scale: it must not vanish as 1/T^2.
    s = torch.tensor([[1.0, -1.0, 0.5]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0, 0.0]])
    grads = []
    for temp in (10.0, 100.0):
        s.grad = None
        distillation_loss(s, t, temp).backward()
        grads.append(s.grad.abs().sum().item())
    assert grads[0] == pytest.approx(grads[1], rel=0.05)


def test_bf16_teacher_logits_computed_in_float32():
    s = torch.randn(3, 4)
    loss = distillation_loss(s, s.to(torch.bfloat16), 4.0)
    assert loss.dtype == torch.float32 and loss.item() < 1e-3


def test_loss_bad_input():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        distillation_loss(torch.zeros(2, 4), torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_loss(torch.zeros(2, 4), torch.zeros(2, 4), 0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        combined_loss(torch.tensor(1.0), torch.tensor(1.0), 1.5)


def test_combined_loss_and_agreement_values():
    task, kd = torch.tensor(2.0), torch.tensor(6.0)
    assert combined_loss(task, kd, 0.0).item() == 2.0
    assert combined_loss(task, kd, 1.0).item() == 6.0
    assert combined_loss(task, kd, 0.25).item() == pytest.approx(3.0)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert top1_agreement(s, t).item() == 0.5


def test_alpha_schedules():
    assert scheduled_alpha(0.3, 0.9, 0.1, "constant") == 0.9
    assert scheduled_alpha(0.25, 1.0, 0.0, "linear") == pytest.approx(0.75)
    assert scheduled_alpha(0.25, 1.0, 0.0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert scheduled_alpha(-1.0, 0.2, 0.8, "linear") == 0.2 and scheduled_alpha(2.0, 0.2, 0.8, "cosine") == 0.8
    with pytest.raises(ValueError, match="alpha_schedule must be one of"):
        scheduled_alpha(0.5, 0.2, 0.8, "step")


def test_kl_reference_from_torch():
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    ref = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    assert distillation_loss(s, t, 2.0).item() == pytest.approx(ref.item(), rel=1e-5)
