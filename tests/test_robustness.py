"""Bad inputs end in one clear line and a non-zero exit; runs neither destroy each other nor lose their work."""
import os
import stat
import subprocess
import sys

import pytest
import torch

import train_gpt as tg
from test_loader import write_shard
from test_sample import tiny_model
from test_train import SMOKE, pattern_corpus, smoke_run  # noqa: F401 (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_through_main(monkeypatch, hp, **settings) -> int:
    """`python train_gpt.py` with SMOKE=1, hp's data and run name, and settings, all in the environment."""
    base = {"SMOKE": 1, "TRAIN_FILES": hp.train_files, "VAL_FILES": hp.val_files, "RUN_NAME": hp.run_name}
    for name, value in (base | settings).items():
        monkeypatch.setenv(name, str(value))
    return tg.main([])


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
        tg.load_shard(path, vocab_size=50304)
    assert tg.load_shard(path).tolist() == [tg.BOS, 5, 60_000, 7]  # the format itself is fine


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
        tg.shard_files(str(tmp_path / "x_train_*"))


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
    assert tg.one_edit_apart(a, b) == expected == tg.one_edit_apart(b, a)


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
    tg.save_checkpoint(path, tiny_model("parallax"), SMOKE, step=1)
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
