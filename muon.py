"""Muon, the optimizer of the hidden weight matrices, as the speedrun uses it.

Muon (Keller Jordan, 2024, https://kellerjordan.github.io/posts/muon/) runs SGD with Nesterov momentum
on each hidden 2-D weight and replaces the update U S V^T by its polar factor U V^T, computed
approximately by a few Newton-Schulz-style polynomial iterations in bf16. Embeddings, the LM head and
the scalar parameters (gains, lambdas, biases) go to Adam: `split_parameters` and `build_optimizers`
make that split. Timings: bench/muon.py.
"""
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

# The Polar Express (Amsel, Persson, Musco, Gower, 2025, arXiv:2505.16932): a different odd quintic
# p(x) = a x + b x^3 + c x^5 per iteration, each the minimax choice for the interval of singular values
# the previous ones leave. These are the published coefficients for 5 iterations (safety factor 2e-2,
# cushion 2), as modded-nanogpt uses them. Composed, they map every singular value in [1e-3, 1] into
# [0.859, 1.141] and diverge above about 1.02, so the input must be scaled below 1 with a margin.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Once singular values are near 1, the Newton-Schulz quintic (p(1) = 1, p'(1) = p''(1) = 0)
# tightens them further; Polar Express runs it for iterations beyond its five.
NEWTON_SCHULZ_TAIL = (15 / 8, -10 / 8, 3 / 8)
# The classic fixed Muon quintic: steep at 0, so 5 iterations map [3e-3, 1] into [0.68, 1.20].
QUINTIC = (3.4445, -4.7750, 2.0315)


def _polynomials(coefficients: str, steps: int) -> list[tuple[float, float, float]]:
    if steps < 1:
        raise ValueError(f"orthogonalize needs at least 1 step, got {steps}")
    if coefficients == "polar_express":
        return list(POLAR_EXPRESS[:steps]) + [NEWTON_SCHULZ_TAIL] * (steps - len(POLAR_EXPRESS))
    if coefficients == "quintic":
        return [QUINTIC] * steps
    raise ValueError(f"coefficients must be 'polar_express' or 'quintic', got {coefficients!r}")


def orthogonalize(G: Tensor, steps: int = 5, coefficients: str = "polar_express") -> Tensor:
    """Approximate polar factor U V^T of G = U S V^T, for a matrix or a batch (..., m, n) of them.

    Runs in bf16 and returns bf16 of G's shape. Each singular value s goes to p(s / (1.02 |G|_F)) with
    p the composed polynomial: with polar_express every s >= 1e-3 |G|_F lands in [0.859, 1.141] in exact
    arithmetic, [0.85, 1.15] as measured in bf16. A zero matrix maps to zero, but the null space of a
    rank-deficient G does not stay empty: the bf16 cast leaves singular values near 1e-4 |G|_F there,
    which the iteration amplifies to as much as about 0.4.
    """
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    polynomials = _polynomials(coefficients, steps)
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT  # iterate on the wide orientation so that the Gram matrix X X^T is the small one
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])
    # The Frobenius norm bounds the spectral norm; the 2% margin keeps bf16 rounding below 1.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-7)
    for a, b, c in polynomials:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + b (X X^T) X + c (X X^T)^2 X
    X = X.reshape(*batch_shape, *X.shape[-2:])
    return X.mT if tall else X


def _start_average(stacked: Tensor, world: int):
    """Starts averaging `stacked` (local gradients, padded to a multiple of `world` matrices) over the
    ranks; returns a function that waits and gives this rank's share of len(stacked) / world matrices.
    A SUM reduce-scatter and a division, rather than ReduceOp.AVG, so that one code path serves NCCL and
    gloo (older versions of which lack AVG)."""
    if world == 1:
        return lambda: stacked
    share = stacked.new_empty(len(stacked) // world, *stacked.shape[1:])
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # newer name
    work = reduce_scatter(share, stacked, op=dist.ReduceOp.SUM, async_op=True)

    def finish() -> Tensor:
        work.wait()
        return share.div_(world)

    return finish


def _start_gather(share: Tensor, world: int):
    """Starts gathering every rank's share of updates; returns a function that waits and gives them all."""
    if world == 1:
        return lambda: share
    gathered = share.new_empty(world * len(share), *share.shape[1:])
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # newer name
    work = all_gather(gathered, share.contiguous(), async_op=True)

    def finish() -> Tensor:
        work.wait()
        return gathered

    return finish


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weight matrices: Nesterov momentum, then the update is orthogonalized.

    Per matrix W (rows x cols) with gradient g, averaged over ranks:
        buf = momentum * buf + (1 - momentum) * g;   d = lerp(g, buf, momentum) if nesterov else buf
        W  *= 1 - lr * weight_decay;                 W -= lr * max(1, rows / cols)**0.5 * orthogonalize(d)
    Shape scale: an orthogonalized update has per-element RMS 1/sqrt(max(rows, cols)); the factor makes
    it 1/sqrt(cols) for every shape, i.e. 1/sqrt(fan_in) for an nn.Linear weight (out, in), the same
    size relative to the weight's init scale for tall and wide matrices. It is the speedrun's (and
    Keller Jordan's) convention, so speedrun learning rates (about 0.05) carry over.

    `lr`, `momentum` and `weight_decay` are read from each param group at every step: set
    group["lr"] / group["momentum"] for schedules. Same-shape matrices of a group are orthogonalized as
    one batch. A parameter whose .grad is None is skipped (every rank must skip the same ones).

    Distributed: when torch.distributed is initialized, step() averages the gradients itself; .grad must
    hold each rank's local (un-averaged, possibly accumulated) gradient. Per group of same-shape matrices
    (padded with zero matrices to a multiple of the world size) a reduce-scatter gives each rank the
    averaged gradients of its share; it updates the momentum, orthogonalizes, and the bf16 updates are
    all-gathered, so every rank applies identical updates to all matrices. All reductions are launched
    first, so each group's communication overlaps the math of the ones before it. Each rank does 1/world
    of the orthogonalization, and the bytes moved (fp32 gradients scattered, bf16 updates gathered) are
    3/4 of an fp32 all-reduce. Do not also average the gradients (no DDP around the model): harmless
    but wasted. Momentum buffers are sharded: each rank's state holds only the matrices it owns, so a
    checkpoint needs every rank's optimizer state (or restarts the momentum).

    With check_finite, non-finite gradients raise ValueError before any parameter changes. A NaN or inf
    anywhere in a matrix's gradient, on any rank, spreads to its whole orthogonalized update, so every
    rank detects it from one element per update matrix, at the cost of one host synchronization per
    step. A training loop that stops on a non-finite loss and saves nothing after it can turn it off.
    """

    def __init__(self, params, lr=0.05, momentum=0.95, nesterov=True, weight_decay=0.0, ns_steps=5,
                 coefficients="polar_express", check_finite=True):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"need lr >= 0, 0 <= momentum < 1, weight_decay >= 0; "
                             f"got lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        _polynomials(coefficients, ns_steps)  # validates both
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, coefficients=coefficients)
        super().__init__(params, defaults)
        self.check_finite = check_finite

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.ndim != 2:
                self.param_groups.pop()
                raise ValueError(f"Muon takes only 2-D matrices, got a parameter of shape {tuple(p.shape)}; "
                                 "give it to Adam")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)

        buckets = []  # (group, same-shape params with gradients), in the same order on every rank
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            buckets += [(group, params) for params in by_shape.values()]

        averaging = [_start_average(self._stack_grads(params, world), world) for _, params in buckets]
        gathering = []
        for (group, params), averaged in zip(buckets, averaging):
            share = averaged()
            self._momentum(group, params[rank * len(share) : (rank + 1) * len(share)], share)
            update = orthogonalize(share, group["ns_steps"], group["coefficients"])
            gathering.append(_start_gather(update, world))
        updates = [gathered()[: len(params)] for (_, params), gathered in zip(buckets, gathering)]

        corners = [update[:, 0, 0] for update in updates]  # one element per matrix: see the docstring
        if self.check_finite and corners and not torch.cat(corners).isfinite().all():
            bad = sorted({tuple(ps[0].shape) for (_, ps), c in zip(buckets, corners) if not c.isfinite().all()})
            raise ValueError(f"non-finite gradient in Muon matrices of shape {bad}; parameters left unchanged")

        for (group, params), update in zip(buckets, updates):
            rows, cols = params[0].shape
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            scale = max(1, rows / cols) ** 0.5
            torch._foreach_add_(params, list(update.to(params[0].dtype).unbind(0)), alpha=-group["lr"] * scale)
        return loss

    @staticmethod
    def _stack_grads(params: list[Tensor], world: int) -> Tensor:
        """The local gradients as one (count, rows, cols) tensor, zero-padded to a multiple of world."""
        padded = math.ceil(len(params) / world) * world
        stacked = params[0].grad.new_empty(padded, *params[0].shape)
        torch.stack([p.grad for p in params], out=stacked[: len(params)])
        stacked[len(params) :].zero_()
        return stacked

    def _momentum(self, group: dict, owned: list[Tensor], share: Tensor):
        """Updates the momentum of this rank's matrices and turns `share` (their averaged gradients, then
        zero padding) into the directions to orthogonalize, in place."""
        if not owned:
            return
        grads = list(share[: len(owned)].unbind(0))
        buffers = []
        for p, g in zip(owned, grads):
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(g)
            buffers.append(self.state[p]["momentum_buffer"])
        torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
        if group["nesterov"]:
            torch._foreach_lerp_(grads, buffers, group["momentum"])
        else:
            torch._foreach_copy_(grads, buffers)


def split_parameters(model: nn.Module, head_name: str = "lm_head") -> dict[str, list[nn.Parameter]]:
    """Splits the trainable parameters into optimizer groups:
    "muon": weights of nn.Linear modules (subclasses included) other than the head;
    "embed": nn.Embedding weights; "head": every parameter of the module named `head_name` (a weight tied
    to it lands here); "scalar": everything else (gains, lambdas, biases, raw nn.Parameters)."""
    modules = dict(model.named_modules())
    if head_name not in modules:
        raise ValueError(f"the model has no module named {head_name!r}")
    head = {id(p) for p in modules[head_name].parameters()}
    groups = {"muon": [], "embed": [], "head": [], "scalar": []}
    seen = set()
    for module in modules.values():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in head:
                groups["head"].append(p)
            elif isinstance(module, nn.Embedding):
                groups["embed"].append(p)
            elif isinstance(module, nn.Linear) and name == "weight":
                groups["muon"].append(p)
            else:
                groups["scalar"].append(p)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for params in groups.values() for p in params]
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable, "each parameter in exactly one group"
    return groups


def build_optimizers(model: nn.Module, *, muon_lr: float, embed_lr: float, head_lr: float, scalar_lr: float,
                     muon_momentum: float = 0.95, weight_decay: float = 0.0, adam_betas=(0.8, 0.95),
                     adam_eps: float = 1e-10, muon_check_finite: bool = True) -> tuple[torch.optim.Adam, Muon]:
    """Returns (adam, muon) over `split_parameters(model)`: Adam with one group each for "embed", "head"
    and "scalar" (fused kernels when on CUDA), and Muon with `weight_decay` for the hidden matrices.
    Every group records its base learning rate as group["initial_lr"] for the schedule to scale.

    Distributed: Muon.step() averages its own gradients; the training loop must average the Adam
    parameters' gradients itself (all_reduce) before adam.step().
    """
    groups = split_parameters(model)
    adam_groups = [
        dict(params=groups[name], lr=lr, initial_lr=lr)
        for name, lr in (("embed", embed_lr), ("head", head_lr), ("scalar", scalar_lr))
        if groups[name]
    ]
    on_cuda = all(p.is_cuda for group in adam_groups for p in group["params"])
    adam = torch.optim.Adam(adam_groups, betas=adam_betas, eps=adam_eps, fused=on_cuda)
    muon = Muon([dict(params=groups["muon"], initial_lr=muon_lr)], lr=muon_lr, momentum=muon_momentum,
                weight_decay=weight_decay, check_finite=muon_check_finite)
    return adam, muon
