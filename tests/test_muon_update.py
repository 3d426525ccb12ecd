"""Muon's update against computations written out here: momentum, Nesterov, the orthogonalization,
its max(1, rows/cols)**0.5 scale, learning rate and weight decay, over several steps."""
import pytest
import torch
from torch import nn

from muon import Muon, orthogonalize

# (rows, cols): tall (scale sqrt(rows / cols) = 2), wide (scale 1), nearly square (scale sqrt(5/3)). Not
# square: a random square matrix often has singular values below the 1e-3 |G|_F the band is designed for.
SHAPES = [(64, 16), (16, 48), (40, 24)]
LR, MOMENTUM, WEIGHT_DECAY, STEPS = 0.02, 0.9, 0.1, 4


def polar_factor(M: torch.Tensor) -> torch.Tensor:
    """U V^T of M = U S V^T, exactly (float64 SVD)."""
    U, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U @ Vh


def run_muon(shape, gradients, nesterov=True):
    """Muon's weights after each step on the given gradient sequence, and the starting weights."""
    w = nn.Parameter(torch.randn(shape))
    start = w.detach().clone()
    optimizer = Muon([w], lr=LR, momentum=MOMENTUM, nesterov=nesterov, weight_decay=WEIGHT_DECAY)
    weights = []
    for g in gradients:
        w.grad = g.clone()
        optimizer.step()
        weights.append(w.detach().clone())
    return start, weights


def expected_directions(gradients, nesterov=True):
    """Directions d_t handed to the orthogonalization, from the momentum written out:
    buf_t = mu buf_{t-1} + (1 - mu) g_t;  d_t = (1 - mu) g_t + mu buf_t with Nesterov, else buf_t."""
    buf = torch.zeros_like(gradients[0], dtype=torch.float64)
    directions = []
    for g in gradients:
        g = g.double()
        buf = MOMENTUM * buf + (1 - MOMENTUM) * g
        directions.append((1 - MOMENTUM) * g + MOMENTUM * buf if nesterov else buf.clone())
    return directions


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_step_is_lr_times_scaled_polar_factor_of_nesterov_momentum(shape):
    """Each step removes lr * max(1, rows/cols)**0.5 times (nearly) U V^T of the Nesterov direction, after
    weight decay. orthogonalize maps singular values into [0.85, 1.15] (polar_express, measured in bf16),
    so the step direction is within 0.15 of U V^T in spectral norm; 0.16 leaves room for rounding."""
    rows, cols = shape
    scale = max(1, rows / cols) ** 0.5
    gradients = [torch.randn(shape) for _ in range(STEPS)]
    start, weights = run_muon(shape, gradients)
    previous = start.double()
    for step, (w, d) in enumerate(zip(weights, expected_directions(gradients))):
        direction = (previous * (1 - LR * WEIGHT_DECAY) - w.double()) / (LR * scale)
        gap = torch.linalg.matrix_norm(direction - polar_factor(d), ord=2).item()
        assert gap < 0.16, f"step {step}: spectral distance {gap:.3f} from U V^T of the expected direction"
        previous = w.double()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("nesterov", [True, False])
def test_steps_match_orthogonalize_of_written_out_momentum(shape, nesterov):
    """The same steps with muon.orthogonalize applied to the directions computed here: equal up to the
    bf16 rounding of the orthogonalization's input."""
    rows, cols = shape
    scale = max(1, rows / cols) ** 0.5
    gradients = [torch.randn(shape) for _ in range(STEPS)]
    start, weights = run_muon(shape, gradients, nesterov=nesterov)
    w = start.clone()
    for step, (got, d) in enumerate(zip(weights, expected_directions(gradients, nesterov))):
        w = w * (1 - LR * WEIGHT_DECAY) - LR * scale * orthogonalize(d.float()).float()
        torch.testing.assert_close(got, w, atol=LR * scale * 0.02, rtol=0, msg=f"step {step}")


def test_nesterov_and_plain_momentum_differ_after_the_first_step():
    """The first step's direction is a multiple of g either way (orthogonalization forgets the factor);
    from the second step the two momentum rules move the weights differently, so the tests above can
    tell them apart."""
    gradients = [torch.randn(32, 16) for _ in range(3)]
    directions = expected_directions(gradients, True), expected_directions(gradients, False)
    gap = [torch.linalg.matrix_norm(polar_factor(a) - polar_factor(b), ord=2).item() for a, b in zip(*directions)]
    assert gap[0] < 1e-6 and min(gap[1:]) > 0.3, gap
    torch.manual_seed(0)  # run_muon draws the starting weights: the same ones for both runs
    _, with_nesterov = run_muon((32, 16), gradients, nesterov=True)
    torch.manual_seed(0)
    _, plain = run_muon((32, 16), gradients, nesterov=False)
    assert (with_nesterov[0] - plain[0]).abs().max() < 0.04 * LR  # the first step agrees (to bf16 rounding)
    assert (with_nesterov[1] - plain[1]).abs().max() > 0.2 * LR  # the second does not


def test_batched_matrices_step_like_single_ones():
    """Same-shape matrices are orthogonalized as one batch: each still gets its own update."""
    shape = (48, 16)
    grads = [[torch.randn(shape) for _ in range(3)] for _ in range(2)]
    w = [nn.Parameter(torch.randn(shape)) for _ in range(2)]
    alone = [nn.Parameter(p.detach().clone()) for p in w]
    together_opt = Muon(w, lr=LR, momentum=MOMENTUM)
    alone_opts = [Muon([p], lr=LR, momentum=MOMENTUM) for p in alone]
    for step in range(3):
        for i in range(2):
            w[i].grad, alone[i].grad = grads[i][step].clone(), grads[i][step].clone()
            alone_opts[i].step()
        together_opt.step()
    for a, b in zip(w, alone):
        torch.testing.assert_close(a.detach(), b.detach(), atol=LR * 2 * 0.02, rtol=0)
