import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from muon import Muon, build_optimizers, orthogonalize, split_parameters

# Measured bands (bf16, several seeds): where orthogonalize maps the singular values s of G that lie
# in the range the coefficients were designed for (s >= threshold * |G|_F).
BANDS = {  # coefficients: (threshold, low, high)
    "polar_express": (1e-3, 0.85, 1.15),  # measured 0.858 .. 1.142; exact arithmetic 0.859 .. 1.141
    "quintic": (3e-3, 0.67, 1.21),  # measured 0.680 .. 1.202; exact arithmetic 0.682 .. 1.202
}
# A rank-deficient G is no longer rank-deficient after its bf16 cast: rounding leaves singular values
# near 1e-4 |G|_F in its null space, which the iteration amplifies (polar_express about 1000x at 0,
# quintic about 500x). Measured at most 0.38 and 0.20 over 10 seeds.
NULL_SPACE_MAX = {"polar_express": 0.45, "quintic": 0.25}


def mapped_singular_values(G: torch.Tensor, coefficients: str):
    """Singular values of G relative to |G|_F, and the value orthogonalize maps each to (diag U^T O V)."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    O = orthogonalize(G, coefficients=coefficients).double()
    return S / G.double().norm(), torch.diagonal(U.mT @ O @ Vh.mT), O


@pytest.mark.parametrize("coefficients", ["polar_express", "quintic"])
@pytest.mark.parametrize("shape", [(256, 256), (512, 128), (128, 512)])
def test_singular_values_land_in_band(coefficients, shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    threshold, low, high = BANDS[coefficients]
    relative, mapped, O = mapped_singular_values(G, coefficients)
    designed = relative >= threshold
    assert designed.float().mean() > 0.95  # a square Gaussian matrix has a few smaller ones
    assert low <= mapped[designed].min() and mapped[designed].max() <= high
    assert (mapped > 0).all()  # the smallest ones grow too, only not all the way
    if shape[0] != shape[1]:  # well conditioned: every singular value of the output is in the band
        out = torch.linalg.svdvals(O)
        assert low <= out.min() and out.max() <= high
    assert O.shape == G.shape


@pytest.mark.parametrize("coefficients", ["polar_express", "quintic"])
@pytest.mark.parametrize("shape,rank", [((256, 256), 32), ((512, 128), 16)])
def test_rank_deficient(coefficients, shape, rank):
    torch.manual_seed(1)
    G = torch.randn(shape[0], rank) @ torch.randn(rank, shape[1])
    _, low, high = BANDS[coefficients]
    _, mapped, O = mapped_singular_values(G, coefficients)
    assert low <= mapped[:rank].min() and mapped[:rank].max() <= high
    out = torch.linalg.svdvals(O)
    assert low <= out[:rank].min() and out[:rank].max() <= high
    assert out[rank:].max() <= NULL_SPACE_MAX[coefficients]


def test_orthogonalize_batches_and_edge_cases():
    torch.manual_seed(2)
    batch = torch.randn(2, 3, 48, 24)
    together = orthogonalize(batch)
    assert together.shape == batch.shape and together.dtype == torch.bfloat16
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(together[i, j], orthogonalize(batch[i, j]), atol=1e-2, rtol=0)
    assert not orthogonalize(torch.zeros(16, 8)).any()
    longer = torch.linalg.svdvals(orthogonalize(torch.randn(64, 32), steps=8).float())
    assert (longer - 1).abs().max() < 0.03  # past 5 steps, Newton-Schulz tightens the band to bf16 noise
    with pytest.raises(ValueError, match="shape"):
        orthogonalize(torch.randn(5))
    with pytest.raises(ValueError, match="coefficients"):
        orthogonalize(torch.randn(4, 4), coefficients="cubic")


def test_one_step_matches_the_formula():
    """W <- W (1 - lr wd) - lr max(1, rows/cols)^0.5 orthogonalize(g): the tall matrix gets scale 2."""
    torch.manual_seed(3)
    w0 = torch.randn(64, 16)
    w = nn.Parameter(w0.clone())
    w.grad = torch.randn(64, 16)
    Muon([w], lr=0.1, momentum=0.0, weight_decay=0.5).step()
    expected = w0 * (1 - 0.1 * 0.5) - 0.1 * 2 * orthogonalize(w.grad).float()
    torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=0)


def test_reads_lr_and_momentum_from_the_group_each_step():
    w = nn.Parameter(torch.randn(8, 8))
    optimizer = Muon([w])
    w.grad = torch.randn(8, 8)
    optimizer.param_groups[0]["lr"] = 0.0
    before = w.detach().clone()
    optimizer.step()
    assert torch.equal(w.detach(), before)
    optimizer.param_groups[0].update(lr=0.01, momentum=0.5)
    optimizer.step()
    assert not torch.equal(w.detach(), before)
    # buffer = 0.5 * (0.05 g) + 0.5 g after the second step, with momentum 0.95 then 0.5
    torch.testing.assert_close(optimizer.state[w]["momentum_buffer"], 0.525 * w.grad)


def test_drives_mlp_regression_loss_down():
    torch.manual_seed(4)
    X = torch.randn(512, 32)
    Y = torch.tanh(X @ torch.randn(32, 64) / 4) @ torch.randn(64, 8)
    model = nn.Sequential(nn.Linear(32, 64, bias=False), nn.Tanh(), nn.Linear(64, 8, bias=False))
    optimizer = Muon(model.parameters(), lr=0.1)
    steps, losses = 300, []
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = 0.1 * (1 - step / steps)  # Muon's step size is fixed: decay it
        loss = (model(X) - Y).square().mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.02 * losses[0]  # measured 0.007 to 0.008 of the start over seeds


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(16,\)"):
        Muon([nn.Parameter(torch.randn(16))])
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        Muon([nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(2, 3, 4))])
    with pytest.raises(ValueError, match="momentum"):
        Muon([nn.Parameter(torch.randn(4, 4))], momentum=1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_raises_and_leaves_parameters(bad):
    good, broken = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(6, 6))
    before = [good.detach().clone(), broken.detach().clone()]
    good.grad, broken.grad = torch.randn(8, 4), torch.randn(6, 6)
    broken.grad[2, 3] = bad
    with pytest.raises(ValueError, match=r"non-finite gradient .*\(6, 6\)"):
        Muon([good, broken]).step()
    assert torch.equal(good.detach(), before[0]) and torch.equal(broken.detach(), before[1])


# Two groups; shapes with 3 matrices and 1 matrix (not divisible by 2 ranks), tall, wide and square.
SHAPES = [[(32, 16)] * 3 + [(16, 48)] * 2 + [(24, 24)], [(8, 12)]]


def make_optimizer(params):
    groups = [dict(params=params[:6]), dict(params=params[6:], lr=0.02, nesterov=False, momentum=0.8)]
    return Muon(groups, lr=0.1, weight_decay=0.1)


def distributed_worker(rank, world, port, init, grads, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        params = [nn.Parameter(w.clone()) for w in init]
        optimizer = make_optimizer(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads[rank]):
                p.grad = g.clone()
            optimizer.step()
        buffers = {i: optimizer.state[p]["momentum_buffer"] for i, p in enumerate(params) if p in optimizer.state}
        torch.save(([p.detach() for p in params], buffers), out_dir / f"rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_distributed_step_matches_single_process(tmp_path):
    world, steps = 2, 3
    torch.manual_seed(5)
    shapes = [s for group in SHAPES for s in group]
    init = [torch.randn(s) for s in shapes]
    grads = [[[torch.randn(s) * (r + 1) for s in shapes] for r in range(world)] for _ in range(steps)]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(distributed_worker, args=(world, port, init, grads, tmp_path), nprocs=world)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]

    params = [nn.Parameter(w.clone()) for w in init]
    optimizer = make_optimizer(params)
    for step_grads in grads:
        for i, p in enumerate(params):
            p.grad = sum(g[i] for g in step_grads) / world
        optimizer.step()
    # Same parameters on every rank, equal to one process on the averaged gradients (on gloo they come
    # out bit-identical; the tolerance is bf16 precision of the updates).
    for rank_params, _ in results:
        for got, want, w0 in zip(rank_params, params, init):
            assert not torch.equal(want.detach(), w0)
            torch.testing.assert_close(got, want.detach(), atol=2e-3, rtol=0)
    # Momentum is sharded: each matrix's buffer lives on exactly one rank and equals the reference.
    owned = [i for _, buffers in results for i in buffers]
    assert sorted(owned) == list(range(len(params)))
    for _, buffers in results:
        for i, buffer in buffers.items():
            torch.testing.assert_close(buffer, optimizer.state[params[i]]["momentum_buffer"])


class TinyGPT(nn.Module):
    def __init__(self, vocab=50, dim=16, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(q=nn.Linear(dim, dim, bias=False), mlp=nn.Linear(dim, 4 * dim))) for _ in range(layers)
        )
        self.gains = nn.Parameter(torch.ones(layers))
        self.lambdas = nn.Parameter(torch.zeros(layers, 2))  # 2-D, yet no Linear weight: Adam
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)


def test_split_parameters_puts_every_parameter_in_one_group():
    model = TinyGPT()
    groups = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {key: sorted(names[id(p)] for p in params) for key, params in groups.items()}
    assert by_group == {
        "muon": ["blocks.0.mlp.weight", "blocks.0.q.weight", "blocks.1.mlp.weight", "blocks.1.q.weight"],
        "embed": ["embed.weight"],
        "head": ["lm_head.weight"],
        "scalar": ["blocks.0.mlp.bias", "blocks.1.mlp.bias", "gains", "lambdas"],
    }
    model.lm_head.weight = model.embed.weight  # tied: the head's group takes it
    groups = split_parameters(model)
    assert [len(groups[k]) for k in ("embed", "head")] == [0, 1]
    with pytest.raises(ValueError, match="head"):
        split_parameters(model, head_name="head")


def test_build_optimizers():
    model = TinyGPT()
    adam, muon = build_optimizers(model, muon_lr=0.05, embed_lr=0.3, head_lr=0.008, scalar_lr=0.04)
    adam_groups = [(g["lr"], g["initial_lr"], len(g["params"])) for g in adam.param_groups]
    assert adam_groups == [(0.3, 0.3, 1), (0.008, 0.008, 1), (0.04, 0.04, 4)]
    assert adam.defaults["betas"] == (0.8, 0.95) and adam.defaults["eps"] == 1e-10
    muon_groups = [(g["lr"], g["initial_lr"], g["momentum"], len(g["params"])) for g in muon.param_groups]
    assert muon_groups == [(0.05, 0.05, 0.95, 4)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    adam.step()
    muon.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
