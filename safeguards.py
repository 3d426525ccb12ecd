"""The checks that keep a train_gpt.py run from failing late or losing its work, apart from the training
they guard: misspelled settings, run names that would replace another run, atomic checkpoint writes,
checked checkpoint reads (and what an unloadable one holds instead), the resume check, interrupts that
wait for a step boundary, divergence at validation, the run log (whose header keeps the settings, the
code and the versions a run ran with), and the sample command's arguments. train_gpt.py logs this file
with its own code (its divergence rule and interrupt handling decide how runs end).
"""
import glob
import json
import math
import os
import platform
import shutil
import signal
import subprocess
from dataclasses import asdict
from importlib import metadata

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
# The run log


class RunLog:
    """logs/<run-id>.txt, written by rank 0 only; echo=True also prints the line."""

    def __init__(self, path: str | None, append: bool = False):
        self.file = None
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.file = open(path, "a" if append else "w")

    def write(self, text: str, echo: bool = False):
        if self.file is None:
            return
        self.file.write(text + "\n")
        self.file.flush()
        if echo:
            print(text, flush=True)

    def close(self):
        if self.file is not None:
            self.file.close()


def environment_report() -> str:
    lines = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    for package in ("triton", "nvidia-cutlass-dsl"):
        try:
            lines.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{package} not installed")
    if shutil.which("nvidia-smi"):
        query = "index,name,driver_version,memory.total,power.limit,clocks.max.sm,clocks.max.mem"
        lines.append(subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
                                    capture_output=True, text=True).stdout.rstrip())
    else:
        lines.append("no nvidia-smi: no GPU info")
    return "\n".join(lines)


def write_log_header(log: RunLog, hp, sources: tuple):
    """The log's header: the hyperparameters (hp, a dataclass), the code of sources (file names next to
    this one), the versions and the GPUs."""
    log.write("hyperparameters: " + json.dumps(asdict(hp)))
    here = os.path.dirname(os.path.abspath(__file__))
    for name in sources:
        log.write(f"==== {name} ====")
        path = os.path.join(here, name)
        if os.path.exists(path):
            with open(path) as f:
                log.write(f.read())
        else:
            log.write("(missing)")
    log.write("==== environment ====")
    log.write(environment_report())
    log.write("=" * 100)


# ----------------------------------------------------------------------------------------------
# Run names and checkpoints


def run_paths(run_name: str) -> tuple:
    """(its log, its checkpoint folder)."""
    return f"logs/{run_name}.txt", os.path.join("checkpoints", run_name)


def claim_run_name(hp, continuing: bool, master: bool):
    """A run never replaces another: a run name with a log or checkpoints is refused, unless this run
    continues it (RESUME) or OVERWRITE=1 asks to replace it (rank 0 then removes its log and checkpoints)."""
    log_path, checkpoint_dir = run_paths(hp.run_name)
    taken = os.path.exists(log_path) or bool(glob.glob(os.path.join(glob.escape(checkpoint_dir), "*")))
    if not taken or continuing:
        return
    if not hp.overwrite:
        raise ValueError(f"run name {hp.run_name!r} is taken ({log_path} or {checkpoint_dir}/ exists): choose "
                         "another RUN_NAME, continue that run with RESUME=<one of its checkpoints>, or replace it "
                         "with OVERWRITE=1")
    if master:
        if os.path.exists(log_path):
            os.remove(log_path)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


CHECKPOINT_KIND = "train_gpt.py checkpoint 1"


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str, model: nn.Module, hp, step: int, training_state: dict | None = None):
    """Atomically (temporary file, then rename): plain tensors and dicts, loadable with weights_only=True;
    the hyperparameters (hp, a dataclass) and model.config rebuild the model. training_state (optimizer
    states and the like, see Trainer.save) makes it resumable. Temporary files that an interrupted write
    left in the folder are removed first."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(folder), "*.tmp")):
        os.remove(stale)
    payload = dict(kind=CHECKPOINT_KIND, step=step, hyperparameters=asdict(hp), model_config=asdict(model.config),
                   model={name: t.detach().cpu() for name, t in model.state_dict().items()}, **(training_state or {}))
    temporary = f"{path}.tmp"
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_checkpoint(path: str) -> dict:
    """A checkpoint's contents, loaded with weights_only=True; CheckpointError with one line when path is no
    such file, an unfinished write, not loadable, or not a train_gpt.py checkpoint."""
    if path.endswith(".tmp"):
        raise CheckpointError(f"{path}: an unfinished checkpoint write, not a checkpoint; use a state_step<N>.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a checkpoint torch can load ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path}: not a train_gpt.py checkpoint: {describe_payload(payload, CHECKPOINT_KIND)}")
    return payload


RESUME_MAY_CHANGE = {"run_name", "resume", "overwrite", "val_every", "save_every", "compile"}


def check_resumable(payload: dict, hp, world_size: int) -> dict:
    """payload, the checkpoint hp.resume names, if it can continue this run: it holds optimizer states, was
    written by as many ranks, and trained with these hyperparameters (all but RESUME_MAY_CHANGE)."""
    if "optimizers" not in payload:
        raise CheckpointError(f"{hp.resume}: holds no optimizer states (an older train_gpt.py wrote it); it can be "
                              "sampled from, not resumed")
    if len(payload["optimizers"]) != world_size:
        raise CheckpointError(f"{hp.resume}: written by {len(payload['optimizers'])} rank(s); resume it on as many "
                              f"(Muon's momentum is split over the ranks), not {world_size}")
    saved = payload["hyperparameters"]
    differences = [f"{name.upper()}={saved.get(name)!r} there, {value!r} here" for name, value in asdict(hp).items()
                   if name not in RESUME_MAY_CHANGE and json.dumps(saved.get(name)) != json.dumps(value)]
    if differences:
        raise CheckpointError(f"{hp.resume}: trained with other settings ({first_few(differences)}); set them as "
                              "they were to resume")
    return payload


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
