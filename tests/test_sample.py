"""Generation with the KV cache (train_gpt.py sample) on tiny random models."""
import pytest
import torch

import generate as gen
import train_gpt as tg
from gpt2_data import GPT2_VOCAB
from parallax_kernels import parallax_decode_reference
from test_train import SMOKE, randomized, tiny_config

PROMPTS = [[tg.BOS, 11, 12, 13], [tg.BOS] + list(range(100, 130)), [tg.BOS, 7]]  # 4, 31 and 2 tokens


def tiny_model(attention, seed=0):
    return randomized(tg.GPT(tiny_config(attention)), seed).eval().requires_grad_(False)  # window 48


def greedy_by_recomputation(model, prompt, new_tokens):
    """Greedy decoding without a cache: the whole sequence through the training forward every step."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor(sequence), cu_seqlens=torch.tensor([0, len(sequence)], dtype=torch.int32))
            sequence.append(int(logits[-1, :GPT2_VOCAB].argmax()))
    return sequence[len(prompt):]


@pytest.mark.parametrize("attention, decode", [("parallax", "kernel"), ("parallax", "reference"),
                                               ("softmax", "kernel")])
def test_cached_greedy_equals_recomputation(attention, decode, monkeypatch):
    if decode == "reference":
        monkeypatch.setattr(gen, "parallax_decode", parallax_decode_reference)
    model = tiny_model(attention)
    for prompt in PROMPTS[:2]:
        expected = greedy_by_recomputation(model, prompt, 40)  # the sequence outgrows the window
        result = gen.generate(model, [prompt], 40, stop_token=None)
        assert result.tokens == [expected]


@pytest.mark.parametrize("attention", ["parallax", "softmax"])
def test_batched_prompts_of_different_lengths_match_one_by_one(attention):
    model = tiny_model(attention, seed=1)
    alone = [gen.generate(model, [prompt], 24, stop_token=None).tokens[0] for prompt in PROMPTS]
    assert gen.generate(model, PROMPTS, 24, stop_token=None).tokens == alone
    assert len({tuple(tokens) for tokens in alone}) == len(PROMPTS)  # the rows really differ


def test_rows_stop_at_their_own_end_of_text():
    model = tiny_model("parallax", seed=2)
    free = gen.generate(model, PROMPTS, 12, stop_token=None).tokens
    stop = free[0][3]  # becomes "end of text": row 0 stops before its 4th token
    stopped = gen.generate(model, PROMPTS, 12, stop_token=stop).tokens
    for row, tokens in enumerate(free):
        expected = tokens[:tokens.index(stop)] if stop in tokens else tokens
        assert stopped[row] == expected
    assert len(stopped[0]) == 3


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model("parallax")
    runs = [gen.generate(model, PROMPTS, 16, temperature=1.0, top_k=5, seed=seed, stop_token=None).tokens
            for seed in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]
    logits = torch.randn(4, GPT2_VOCAB + 47)
    allowed = torch.topk(logits[:, :GPT2_VOCAB], 5).indices
    for _ in range(20):
        picked = gen.sample_next(logits, 1.0, 5, None)
        assert (picked[:, None] == allowed).any(-1).all()


def test_sample_command_rejects_bad_checkpoints(tmp_path, capsys):
    assert tg.main(["sample", "--checkpoint", str(tmp_path / "missing.pt"), "--prompt", "hi"]) == 1
    assert capsys.readouterr().err.strip().endswith("missing.pt: no such checkpoint file")
    torch.save({"step": 3, "weights": torch.zeros(2)}, tmp_path / "other.pt")
    assert tg.main(["sample", "--checkpoint", str(tmp_path / "other.pt")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "not a train_gpt.py checkpoint" in error


class ByteEncoding:
    """Stands in for tiktoken's GPT-2 (which needs a download): one token per byte of the prompt."""

    def encode_ordinary(self, text):
        return list(text.encode())

    def decode_single_token_bytes(self, token):
        return f"<{token}>".encode()

    def decode(self, tokens):
        return "".join(f"<{t}>" for t in tokens)


def test_sample_command_streams_and_batches(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "state_step000001.pt")
    tg.save_checkpoint(path, tiny_model("parallax"), SMOKE, step=1)
    monkeypatch.setattr(gen, "load_gpt2_encoding", lambda bpe_file: ByteEncoding())
    expected = gen.generate(tiny_model("parallax"), [[tg.BOS, 104, 105]], 6, stop_token=None).tokens[0]
    assert tg.main(["sample", "--checkpoint", path, "--prompt", "hi", "--max-new-tokens", "6",
                    "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "hi" + "".join(f"<{t}>" for t in expected) + "\n"  # streamed as generated
    assert "tokens/s" in captured.err
    (tmp_path / "prompts.txt").write_text("hi\n\nthere\n")
    assert tg.main(["sample", "--checkpoint", path, "--prompts-file", str(tmp_path / "prompts.txt"),
                    "--num-samples", "2", "--max-new-tokens", "6", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("---- sample") == 4 and "(prompt 2)" in out and "there<" in out


def test_sample_command_says_how_to_provide_the_encoding(tmp_path, monkeypatch, capsys):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    path = str(tmp_path / "state_step000001.pt")
    tg.save_checkpoint(path, tiny_model("softmax"), SMOKE, step=1)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    assert tg.main(["sample", "--checkpoint", path, "--prompt", "hi"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "TIKTOKEN_CACHE_DIR" in error and "--bpe-file" in error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("use_graph", [False, True])
def test_decode_kernel_matches_reference_on_gpu(use_graph, monkeypatch):
    """32 greedy steps through the decode kernel, teacher-forcing the reference path with the same
    tokens: logits agree to bf16 precision at every step, and every kernel token is the reference's
    greedy choice (up to a bf16-sized margin, since a near-tie of a random model may flip either way)."""
    torch.manual_seed(0)
    config = tg.model_config(tg.Hyperparameters(num_layers=2, model_dim=256, num_heads=2, head_dim=128,
                                                num_value_embeds=1, window_schedule=(64,)))
    model = gen.prepare_for_inference(randomized(tg.GPT(config)), torch.device("cuda"))
    prompts = [[tg.BOS] + torch.randint(0, tg.BOS, (n,)).tolist() for n in (5, 90, 33)]  # 90 > window
    caches = [gen.KVCache(config, len(prompts), 128, "cuda", model.lm_head.weight.dtype) for _ in range(2)]
    kernel_step = gen.DecodeStep(model, caches[0], use_graph=use_graph)
    kernel_logits = gen.prefill(model, caches[0], prompts)
    reference_logits = gen.prefill(model, caches[1], prompts)
    exact = 0
    for _ in range(32):
        kernel_logits, reference_logits = kernel_logits[:, :GPT2_VOCAB].float(), reference_logits[:, :GPT2_VOCAB].float()
        assert torch.isfinite(kernel_logits).all()
        assert ((kernel_logits - reference_logits).norm() / reference_logits.norm()).item() < 2e-2
        tokens = kernel_logits.argmax(-1)
        chosen = reference_logits.gather(1, tokens[:, None])[:, 0]
        margin = 0.02 * reference_logits.std(dim=-1)
        assert (chosen >= reference_logits.max(-1).values - margin).all()
        exact += int((tokens == reference_logits.argmax(-1)).sum())
        kernel_logits = kernel_step(tokens)
        with monkeypatch.context() as patch:
            patch.setattr(gen, "parallax_decode", parallax_decode_reference)
            reference_logits = gen.decode_step(model, caches[1], tokens)
    assert exact >= 0.9 * 32 * len(prompts)
