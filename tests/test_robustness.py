"""Bad inputs end in one clear line and a non-zero exit; runs neither destroy each other nor lose their work."""
import itertools
import os
import signal
import stat
import subprocess
from dataclasses import replace

import pytest
import torch

import train_gpt as tg
from gpt2_data import load_shard, shard_files
from records.compare import parse_log
from safeguards import one_edit_apart
from test_loader import write_shard
from test_sample import tiny_model
from test_train import SMOKE, smoke_run, tiny_config  # noqa: F401 (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_through_main(monkeypatch, hp, **settings) -> int:
    """`python train_gpt.py` with SMOKE=1, hp's data and run name, and settings, all in the environment."""
    base = {"SMOKE": 1, "TRAIN_FILES": hp.train_files, "VAL_FILES": hp.val_files, "RUN_NAME": hp.run_name}
    for name, value in (base | settings).items():
        monkeypatch.setenv(name, str(value))
    return tg.main([])


@pytest.fixture
def quick_run(smoke_run):
    """The smoke run with half-length sequences and a validation of 2 of them: enough for control flow."""
    return replace(smoke_run, seq_len=128, val_tokens=256)


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error


# ----------------------------------------------------------------------------------------------
# Shards


def test_a_token_id_outside_the_vocabulary_names_the_shard(tmp_path):
    path = tmp_path / "other_tokenizer_000000.bin"
    write_shard(path, [tg.BOS, 5, 60_000, 7])
    with pytest.raises(ValueError, match=r"other_tokenizer_000000.bin: token id 60000 is outside the vocabulary "
                                         r"\(50304 ids\).*tokenize_text.py"):
        load_shard(path, vocab_size=50304)
    assert load_shard(path).tolist() == [tg.BOS, 5, 60_000, 7]  # the format itself is fine


def test_a_bad_shard_stops_training_with_one_line(smoke_run, monkeypatch, capsys):
    write_shard("bad_val_000000.bin", [tg.BOS] + [60_000] * 4096)
    assert train_through_main(monkeypatch, smoke_run, VAL_FILES="bad_val_*.bin") == 2
    assert one_line_error(capsys) == ("error: bad_val_000000.bin: token id 60000 is outside the vocabulary (50304 "
                                      "ids): not GPT-2 tokens; re-tokenize the text with data/tokenize_text.py, or "
                                      "set VOCAB_SIZE above it")


def test_a_folder_matching_the_shard_pattern_is_refused(tmp_path):
    write_shard(tmp_path / "x_train_000001.bin", [tg.BOS, 1, 2])
    (tmp_path / "x_train_backup").mkdir()
    with pytest.raises(ValueError, match="matches the folder .*x_train_backup, not only shard files"):
        shard_files(str(tmp_path / "x_train_*"))


# ----------------------------------------------------------------------------------------------
# Settings


def test_a_misspelled_setting_is_an_error():
    with pytest.raises(ValueError, match=r"unknown setting NUM_ITERATION='2'; did you mean NUM_ITERATIONS\?"):
        tg.hyperparameters_from_env({"NUM_ITERATION": "2"})
    with pytest.raises(ValueError, match="did you mean SEED"):
        tg.hyperparameters_from_env({"SEDE": "1"})


def test_ordinary_environment_variables_are_not_settings():
    ordinary = ["PATH", "HOME", "USER", "SHELL", "LANG", "TERM", "PWD", "OLDPWD", "HOSTNAME", "TMPDIR", "EDITOR",
                "PYTHON", "PYTHONPATH", "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE",
                "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
                "NCCL_DEBUG", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TRITON_INTERPRET",
                "TIKTOKEN_CACHE_DIR", "HF_HOME", "HF_TOKEN", "VIRTUAL_ENV", "CONDA_PREFIX", "SHLVL"]
    environ = {name: "x" for name in ordinary} | dict(os.environ)
    environ = {name: value for name, value in environ.items() if name.upper() not in
               {field.name.upper() for field in tg.fields(tg.Hyperparameters)}}
    assert tg.hyperparameters_from_env(environ) == tg.Hyperparameters()


@pytest.mark.parametrize("a, b, expected", [("NUM_ITERATION", "NUM_ITERATIONS", True),
                                            ("NUM_ITERATINOS", "NUM_ITERATIONS", True),
                                            ("SEEX", "SEED", True), ("XSEED", "SEED", True),
                                            ("SEED", "SEED", False), ("SE", "SEED", False),
                                            ("SDEX", "SEED", False)])
def test_one_edit_apart(a, b, expected):
    assert one_edit_apart(a, b) == expected == one_edit_apart(b, a)


# ----------------------------------------------------------------------------------------------
# Sampling arguments and checkpoints


@pytest.mark.parametrize("arguments, message", [
    (["--prompts-file", "missing.txt"], "--prompts-file missing.txt: no such file"),
    (["--top-k", "-3"], "--top-k must be >= 0 (0: no top-k cut), got -3"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0: greedy), got nan"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0: greedy), got -1.0"),
])
def test_sampling_arguments_are_checked_before_anything_loads(arguments, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        tg.main(["sample", "--checkpoint", str(tmp_path / "not_needed_yet.pt")] + arguments)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_a_checkpoint_of_another_config_names_the_keys_and_shapes(tmp_path, capsys):
    path = str(tmp_path / "state_step000001.pt")
    without_gain = tg.GPT(tiny_config("parallax", r_gain="none"))  # so that an r gain is a key it lacks
    tg.save_checkpoint(path, without_gain, replace(SMOKE, r_gain="none"), step=1)
    payload = torch.load(path, weights_only=True)
    payload["model"]["blocks.0.attn.q.weight"] = torch.zeros(32, 64)
    payload["model"]["blocks.0.attn.r_gain"] = torch.zeros(1)
    del payload["model"]["skip_weights"]
    torch.save(payload, path)
    assert tg.main(["sample", "--checkpoint", path]) == 1
    error = one_line_error(capsys)
    assert error.endswith("does not match this train_gpt.py's model: missing skip_weights; unexpected "
                          "blocks.0.attn.r_gain; shapes differ: blocks.0.attn.q.weight (32, 64) (model (64, 64))")


@pytest.mark.parametrize("payload, description", [
    ({"kind": "some other tool 3", "model": {}}, "its kind is 'some other tool 3', this script reads"),
    ({"embed.weight": torch.zeros(2), "lm_head.weight": torch.zeros(2)},
     "a bare state dict of 2 tensors ('embed.weight', 'lm_head.weight'), without the model config"),
    ({"step": 3, "weights": torch.zeros(2)}, "a dict with keys 'step', 'weights', without the 'kind'"),
    ([1, 2], "it holds a list"),
])
def test_a_file_of_another_kind_says_what_it_holds(payload, description, tmp_path):
    path = str(tmp_path / "other.pt")
    torch.save(payload, path)
    with pytest.raises(tg.CheckpointError, match="not a train_gpt.py checkpoint: " + description.replace("(", r"\(")
                       .replace(")", r"\)")):
        tg.load_checkpoint(path)


# ----------------------------------------------------------------------------------------------
# The launcher


def test_run_sh_checks_for_a_gpu_before_fetching_data(tmp_path):
    """A stand-in nvidia-smi that lists no GPU, and a stand-in Python that records being called."""
    calls = tmp_path / "python_calls"
    for name, body in (("nvidia-smi", "exit 0"), ("python", f'echo "$@" >> {calls}')):
        script = tmp_path / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    environ = {name: value for name, value in os.environ.items() if name not in ("TRAIN_FILES", "VAL_FILES")}
    environ |= {"PATH": f"{tmp_path}:{environ['PATH']}", "PYTHON": str(tmp_path / "python")}
    result = subprocess.run(["bash", os.path.join(REPO, "run.sh")], env=environ, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no NVIDIA GPU found") and len(result.stderr.splitlines()) == 1
    assert not calls.exists() and "fetching" not in result.stdout


# ----------------------------------------------------------------------------------------------
# Run names


def test_a_taken_run_name_is_refused_and_left_alone(quick_run, monkeypatch, capsys):
    os.makedirs("logs")
    with open("logs/smoke.txt", "w") as f:
        f.write("the first run's log\n")
    assert train_through_main(monkeypatch, quick_run) == 2
    assert one_line_error(capsys) == ("error: run name 'smoke' is taken (logs/smoke.txt or checkpoints/smoke/ exists): "
                                      "choose another RUN_NAME, continue that run with RESUME=<one of its "
                                      "checkpoints>, or replace it with OVERWRITE=1")
    assert open("logs/smoke.txt").read() == "the first run's log\n"
    os.remove("logs/smoke.txt")
    os.makedirs("checkpoints/smoke")
    open("checkpoints/smoke/state_step000030.pt", "w").close()
    with pytest.raises(ValueError, match="run name 'smoke' is taken"):
        tg.train(quick_run)


def test_overwrite_replaces_the_old_run(quick_run):
    os.makedirs("checkpoints/smoke")
    open("checkpoints/smoke/state_step000002.pt", "w").close()
    assert tg.train(replace(quick_run, num_iterations=1, overwrite=True)) == 0
    assert os.listdir("checkpoints/smoke") == ["state_step000001.pt"]  # runs do not mix in one folder


# ----------------------------------------------------------------------------------------------
# Divergence


def test_a_run_that_learns_nothing_stops_after_the_first_tenth(quick_run, capsys):
    """Learning rates of 0 stand in for ones so large that the model sits at the untrained loss."""
    frozen = dict(muon_lr=0.0, embed_lr=0.0, head_lr=0.0, scalar_lr=0.0)
    assert tg.train(replace(quick_run, num_iterations=20, val_every=1, save_every=1, **frozen)) == 1
    lines = capsys.readouterr().out.splitlines()
    untrained = next(line for line in lines if line.startswith("step:0/20 val_loss:")).split()[1].split(":")[1]
    assert lines[-1] == (f"stopped: step:2/20 val_loss:{untrained} is no better than the untrained model's "
                         f"{untrained}: diverged. Last good checkpoint: checkpoints/smoke/state_step000001.pt")
    assert parse_log("logs/smoke.txt")["status"].startswith("stopped: step:2/20")
    assert sorted(os.listdir("checkpoints/smoke")) == ["state_step000001.pt", "state_step000002.pt"]  # both kept


def test_a_non_finite_validation_loss_stops_the_run(quick_run, monkeypatch, capsys):
    forward, validations = tg.GPT.forward, itertools.count()

    def poisoned(self, *args, **kwargs):  # 2 batches per validation: 256 tokens in sequences of 128
        loss = forward(self, *args, **kwargs)
        return loss if torch.is_grad_enabled() or next(validations) < 4 else loss * float("nan")

    monkeypatch.setattr(tg.GPT, "forward", poisoned)
    assert tg.train(replace(quick_run, num_iterations=10, val_every=2, save_every=2)) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        "stopped: step:4/10 val_loss:nan is not finite: diverged. Last good checkpoint: "
        "checkpoints/smoke/state_step000002.pt")
    assert parse_log("logs/smoke.txt")["status"].startswith("stopped: step:4/10 val_loss:nan")


def test_a_run_stopped_by_bad_data_says_so_in_its_log(quick_run):
    write_shard("bad_val_000000.bin", [tg.BOS] + [60_000] * 4096)
    with pytest.raises(ValueError, match="token id 60000"):
        tg.train(replace(quick_run, val_files="bad_val_*.bin"))
    assert parse_log("logs/smoke.txt")["status"].startswith("stopped: ValueError: bad_val_000000.bin: token id 60000")


# ----------------------------------------------------------------------------------------------
# Interrupts and resuming


def interrupted_at_step(step: int, signal_number: int, monkeypatch):
    """The signal arrives during the given training step (2 micro-batches per step on one rank)."""
    forward, micro_batches = tg.GPT.forward, itertools.count()

    def forward_then_signal(self, *args, **kwargs):
        if torch.is_grad_enabled() and next(micro_batches) == 2 * (step - 1):
            signal.raise_signal(signal_number)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(tg.GPT, "forward", forward_then_signal)


def test_an_interrupted_run_resumes_to_the_same_losses(quick_run, monkeypatch, capsys):
    hp = replace(quick_run, num_iterations=6, val_every=3)
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN, not Python's, when started in the background
    assert tg.train(replace(hp, run_name="straight")) == 0
    with monkeypatch.context() as patch:
        interrupted_at_step(2, signal.SIGINT, patch)
        assert tg.train(replace(hp, run_name="stopped")) == 130
    assert capsys.readouterr().out.splitlines()[-1] == (
        "stopped: step:2/6 interrupted by SIGINT; saved checkpoints/stopped/state_step000002.pt; continue with "
        "RESUME=checkpoints/stopped/state_step000002.pt")
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
    assert parse_log("logs/stopped.txt")["status"].startswith("stopped: step:2/6 interrupted by SIGINT")

    assert tg.train(replace(hp, run_name="", resume="checkpoints/stopped/state_step000002.pt")) == 0
    straight, resumed = parse_log("logs/straight.txt"), parse_log("logs/stopped.txt")
    assert resumed["status"] == "complete"
    assert resumed["train"] == straight["train"] and len(straight["train"]) == 6  # every printed digit
    assert resumed["val"] == straight["val"] and [step for step, _ in straight["val"]] == [0, 3, 6]
    assert sorted(os.listdir("checkpoints/stopped")) == ["state_step000002.pt", "state_step000006.pt"]
    straight_model, _ = tg.load_checkpoint("checkpoints/straight/state_step000006.pt")  # sample's path
    resumed_model, checkpoint = tg.load_checkpoint("checkpoints/stopped/state_step000006.pt")
    assert checkpoint["step"] == 6 and "optimizers" in checkpoint
    for (name, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpointed_optimizer_groups_are_those_make_optimizers_builds(quick_run):
    """The r gains' Adam group and W_r's Muon group (regroup) are saved and come back in the same order."""
    assert quick_run.r_gain == "head" and quick_run.attention == "parallax"
    assert tg.train(replace(quick_run, num_iterations=1)) == 0
    saved = torch.load("checkpoints/smoke/state_step000001.pt", weights_only=True)["optimizers"][0]
    model = tg.GPT(tg.model_config(quick_run))
    optimizers, _, _ = tg.make_optimizers(model, quick_run, torch.device("cpu"))
    assert len(saved) == len(optimizers) == 2
    for state, optimizer in zip(saved, optimizers):
        built = optimizer.state_dict()["param_groups"]
        assert [(g["params"], g["initial_lr"]) for g in state["param_groups"]] == [
            (g["params"], g["initial_lr"]) for g in built]
    gains = [id(block.attn.r_gain) for block in model.blocks]
    gain_groups = [g for g in optimizers[0].param_groups if {id(p) for p in g["params"]} == set(gains)]
    assert len(gain_groups) == 1 and gain_groups[0]["initial_lr"] == quick_run.r_gain_lr
    assert all(len(state["state"]) == sum(len(g["params"]) for g in state["param_groups"]) for state in saved)


def test_sigterm_saves_the_current_step(quick_run, monkeypatch, capsys):
    interrupted_at_step(2, signal.SIGTERM, monkeypatch)
    assert tg.train(replace(quick_run, save_every=2)) == 143
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "stopped: step:2/30 interrupted by SIGTERM; saved checkpoints/smoke/state_step000002.pt")
    payload = torch.load("checkpoints/smoke/state_step000002.pt", weights_only=True)
    assert payload["step"] == 2 and len(payload["optimizers"]) == 1  # one rank
    assert os.listdir("checkpoints/smoke") == ["state_step000002.pt"]


def test_resume_refuses_other_settings_and_checkpoints_without_optimizer_states(quick_run, tmp_path):
    interrupted_path = "checkpoints/smoke/state_step000001.pt"
    assert tg.train(replace(quick_run, num_iterations=1)) == 0
    with pytest.raises(tg.CheckpointError, match=r"trained with other settings \(NUM_ITERATIONS=1 there, 30 here\)"):
        tg.train(replace(quick_run, resume=interrupted_path))
    tg.save_checkpoint(str(tmp_path / "model_only.pt"), tiny_model("parallax"), SMOKE, step=1)
    with pytest.raises(tg.CheckpointError, match="holds no optimizer states"):
        tg.train(replace(quick_run, resume=str(tmp_path / "model_only.pt"), run_name="other"))


def test_temporary_files_are_never_checkpoints_and_go_at_the_next_save(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "state_step000004.pt.tmp").write_bytes(b"half a checkpoint")
    with pytest.raises(tg.CheckpointError, match="an unfinished checkpoint write, not a checkpoint"):
        tg.load_checkpoint(str(folder / "state_step000004.pt.tmp"))
    tg.save_checkpoint(str(folder / "state_step000006.pt"), tiny_model("parallax"), SMOKE, step=6)
    assert os.listdir(folder) == ["state_step000006.pt"]
