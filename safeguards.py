"""The checks that keep a train_gpt.py run from failing late or losing its work, apart from the training
they guard: misspelled settings, interrupts that wait for a step boundary, divergence at validation,
what an unloadable checkpoint holds instead, and the sample command's arguments. train_gpt.py logs
this file with its own code (its divergence rule and interrupt handling decide how runs end).
"""
import math
import os
import signal

import torch
import torch.distributed as dist
from torch import Tensor, nn


def check_for_misspelled_settings(environ, names: list):
    """A variable whose name is one typo away from one of names (the settings) is an error, not silently
    ignored; other variables (PATH, HOME, ...) are not within one edit of any setting's name."""
    for variable in sorted(environ):
        if variable in names or not variable.isupper():
            continue
        near = [name for name in names if one_edit_apart(variable, name)]
        if near:
            raise ValueError(f"unknown setting {variable}={environ[variable]!r}; did you mean {near[0]}?")


def one_edit_apart(a: str, b: str) -> bool:
    """True when a and b differ by one inserted, deleted or replaced character, or two swapped neighbours."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    if len(a) < len(b):
        return a[i:] == b[i + 1:]
    return a[i + 1:] == b[i + 1:] or (a[i:i + 2] == b[i:i + 2][::-1] and a[i + 2:] == b[i + 2:])


# ----------------------------------------------------------------------------------------------
# Interrupts and divergence

INTERRUPT_CHECK_EVERY = 10  # steps between the ranks' agreement on an interrupt (a single rank checks every step)


class InterruptRequests:
    """While training, SIGINT and SIGTERM only set a flag, and the loop checkpoints and stops at a step
    boundary where the ranks agree. A second signal changes nothing (torchrun follows a Ctrl-C with
    SIGTERM). Several ranks all-reduce the flag and read it on the host only every INTERRUPT_CHECK_EVERY
    steps, so the other steps add no collective or host sync for it."""

    def __init__(self, world_size: int, device: torch.device):
        self.world_size, self.device = world_size, device
        self.received = 0  # the first signal's number

    def __enter__(self):
        self.previous = {number: signal.signal(number, self._receive) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _receive(self, number, frame):
        self.received = self.received or number

    def agreed(self, step: int) -> int:
        """The number of a signal some rank received, at a boundary where the ranks compare (0: none)."""
        if self.world_size == 1:
            return self.received
        if step % INTERRUPT_CHECK_EVERY:
            return 0
        flag = torch.tensor(self.received, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


DIVERGENCE_GRACE = 0.1  # the fraction of training after which a val loss no better than the untrained one stops it


def divergence(step: int, val_loss: float, untrained_val_loss: float, num_iterations: int) -> str | None:
    """Why this validation stops the run, or None. Huge learning rates need not give a NaN: they can
    leave the model predicting the uniform distribution, the untrained model's loss, for good."""
    if not math.isfinite(val_loss):
        return "is not finite"
    if step > 0 and step >= DIVERGENCE_GRACE * num_iterations and val_loss >= untrained_val_loss:
        return f"is no better than the untrained model's {untrained_val_loss:.4f}"
    return None


# ----------------------------------------------------------------------------------------------
# Checkpoints


def cpu_copy(tree):
    """Tensors of a nested optimizer state dict moved to the CPU (gather_object and torch.save take them there)."""
    if isinstance(tree, Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {key: cpu_copy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cpu_copy(value) for value in tree)
    return tree


def describe_payload(payload, kind: str) -> str:
    """What a file that is not a checkpoint of this kind holds instead, in a few words."""
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}"
    if "kind" in payload:
        return f"its kind is {payload['kind']!r}, this script reads {kind!r}"
    keys = first_few([repr(key) for key in payload])
    if payload and all(isinstance(value, Tensor) for value in payload.values()):
        return (f"a bare state dict of {len(payload)} tensors ({keys}), without the model config and kind "
                "a checkpoint carries")
    return f"a dict with keys {keys}, without the 'kind' and 'model_config' a checkpoint carries"


def state_dict_mismatch(model: nn.Module, state: dict) -> str:
    """The keys and shapes where state differs from model's parameters and buffers ("" when it fits)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    given = {name: tuple(t.shape) for name, t in state.items()}
    differences = {
        "missing": [name for name in expected if name not in given],
        "unexpected": [name for name in given if name not in expected],
        "shapes differ:": [f"{name} {given[name]} (model {shape})" for name, shape in expected.items()
                           if name in given and given[name] != shape],
    }
    return "; ".join(f"{what} {first_few(items)}" for what, items in differences.items() if items)


def first_few(items: list, n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------
# Sampling


def sampling_arguments_problem(args) -> str | None:
    """What is wrong with the sample command's arguments, checked before the checkpoint loads; None if nothing."""
    if args.num_samples < 1 or args.max_new_tokens < 1:
        return "--num-samples and --max-new-tokens must be at least 1"
    if not math.isfinite(args.temperature) or args.temperature < 0:
        return f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}"
    if args.top_k < 0:
        return f"--top-k must be >= 0 (0: no top-k cut), got {args.top_k}"
    if args.prompts_file is not None and not os.path.isfile(args.prompts_file):
        return f"--prompts-file {args.prompts_file}: no such file"
    return None
