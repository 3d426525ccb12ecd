"""Sampling from a trained model: a preallocated KV cache, one packed prefill of every prompt, then one
token per row per decode step (Parallax through parallax_decode, softmax through SDPA), optionally
torch.compiled and replayed from a CUDA graph. `python train_gpt.py sample` is its command line: its
arguments and its text (prompts, encoding, streaming, printing) are here, the checkpoint's model is
train_gpt.py's.

It takes the model as an object (train_gpt.GPT: config, layer_windows, packed_attention, rotary, hidden_states,
logits, lm_head) and imports nothing from train_gpt.py, which imports it.
"""
import codecs
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_data import BOS, GPT2_VOCAB, load_gpt2_encoding
from parallax_kernels import parallax_decode, visible


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class KVCache:
    """Keys and values of every layer, (B, max_len, H, D) each, and the valid length of every row."""

    def __init__(self, config, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, max_len, config.num_heads, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.lengths = torch.zeros(batch_size, device=device, dtype=torch.int32)  # updated in place only
        self.rows = torch.arange(batch_size, device=device)
        self.max_len = max_len


@torch.no_grad()
def prefill(model, cache: KVCache, prompts: list) -> Tensor:
    """Run all prompts as one packed sequence (documents never see each other), store their keys and
    values in the cache rows, and return the logits of each prompt's last token (B, vocab)."""
    device = cache.lengths.device
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.tensor([t for p in prompts for t in p], device=device)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device, torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()]).to(device)
    rows = torch.repeat_interleave(cache.rows, lengths.to(device))
    inner = model.packed_attention(cu_seqlens, tokens.numel())

    def attend(layer, q, r, k, v):
        cache.k[layer][rows, positions] = k[0]
        cache.v[layer][rows, positions] = v[0]
        return inner(layer, q, r, k, v)

    x = model.hidden_states(tokens[None], model.rotary.at(positions, cache.max_len), attend)[0]
    cache.lengths.copy_(lengths.to(device, torch.int32))
    return model.logits(x[cu_seqlens[1:].long() - 1])


def cached_attention(parallax: bool, q, r, k_cache, v_cache, lengths, window: int, scale: float):
    """One new query per row (B, 1, H, D) over its row's cache; lengths (B,) counts the valid keys, the
    new one included. Parallax through parallax_decode; softmax through SDPA with a length mask."""
    if parallax:
        return parallax_decode(q, r, k_cache, v_cache, lengths, window=window, scale=scale)
    key_pos = torch.arange(k_cache.size(1), device=q.device)
    seen = visible((lengths - 1).long()[:, None], key_pos, window)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                       attn_mask=seen[:, None, None, :], scale=scale)
    return y.transpose(1, 2)


@torch.compiler.disable  # eager inside a compiled step too: in-place cache writes, opaque kernels
def store_and_attend(config, cache: KVCache, layer: int, positions, lengths, q, r, k, v, window: int):
    cache.k[layer][cache.rows, positions] = k[:, 0]
    cache.v[layer][cache.rows, positions] = v[:, 0]
    return cached_attention(config.parallax, q, r, cache.k[layer], cache.v[layer], lengths, window, config.attn_scale)


def decode_step(model, cache: KVCache, tokens: Tensor) -> Tensor:
    """Feed one token per row (B,), append its keys and values, advance the lengths; -> logits (B, vocab).
    Only in-place updates of preallocated tensors, so the whole step can be captured in a CUDA graph."""
    positions = cache.lengths.long()  # where the new token goes
    lengths = cache.lengths + 1
    windows = model.layer_windows()

    def attend(layer, q, r, k, v):
        return store_and_attend(model.config, cache, layer, positions, lengths, q, r, k, v, windows[layer])

    x = model.hidden_states(tokens[:, None], model.rotary.at(positions[:, None], cache.max_len), attend)
    cache.lengths.copy_(lengths)
    return model.logits(x[:, 0])


def capture_cuda_graph(fn, warmup_calls: int = 2):
    """Run fn for real on a side stream first (compiling kernels, allocating workspaces), then capture
    one call of it; -> (the graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


class DecodeStep:
    """decode_step, eager or replayed from a CUDA graph (static token buffer, cache lengths in place);
    with use_compile the step is torch.compiled first, fusing the small ops between the matmuls."""

    def __init__(self, model, cache, use_graph=False, use_compile=False):
        self.args = (model, cache)
        self.step = decode_step
        model.rotary.prefix(cache.max_len, cache.rows.device)  # built before compiling or capturing the step
        if use_compile:
            # a graph per model, batch size and cache length: more than torch.compile's default 8 in a bench
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.step = torch.compile(decode_step, dynamic=False)
        self.graph = None
        if not use_graph:
            return
        if cache.lengths.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.tokens = torch.zeros_like(cache.rows)
        self.graph, self.logits = capture_cuda_graph(lambda: self.step(model, cache, self.tokens))
        cache.lengths.zero_()  # the warm-up calls advanced them; the graph reads them at replay

    def __call__(self, tokens: Tensor) -> Tensor:
        if self.graph is None:
            return self.step(*self.args, tokens)
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    """(B, vocab) -> (B,) tokens: greedy at temperature 0, else top-k sampling; padded ids never."""
    logits = logits[:, :GPT2_VOCAB]
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class Generation(NamedTuple):
    tokens: list  # per prompt, the new tokens (end-of-text excluded)
    prefill_s: float
    decode_s: float


@torch.no_grad()
def generate(model, prompts: list, max_new_tokens: int, *, temperature=0.0, top_k=None, seed=0,
             stop_token: int | None = BOS, use_graph=False, use_compile=False, on_token=None) -> Generation:
    """Continue every prompt (lists of token ids, each starting with BOS) by up to max_new_tokens,
    stopping a row at stop_token. Rows keep their own cache lengths, so prompts may differ in length.
    on_token(row, token) is called for every new token as it is sampled."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    weight = model.lm_head.weight
    device = weight.device
    cache = KVCache(model.config, len(prompts), max(map(len, prompts)) + max_new_tokens, device, weight.dtype)
    step = DecodeStep(model, cache, use_graph, use_compile)  # captured before the prefill fills the cache
    generator = torch.Generator(device).manual_seed(seed)
    synchronize(device)
    start = time.perf_counter()
    logits = prefill(model, cache, prompts)
    synchronize(device)
    decode_start = time.perf_counter()
    outputs = [[] for _ in prompts]
    active = [True] * len(prompts)
    for i in range(max_new_tokens):
        next_tokens = sample_next(logits, temperature, top_k, generator)
        for row, token in enumerate(next_tokens.tolist()):
            if not active[row]:
                continue
            if token == stop_token:
                active[row] = False
                continue
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
        if not any(active) or i == max_new_tokens - 1:
            break
        logits = step(next_tokens)
    return Generation(outputs, decode_start - start, time.perf_counter() - decode_start)


class TextStream:
    """Prints tokens as text the moment they arrive, holding back the bytes of an unfinished character."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, row, token):
        sys.stdout.write(self.decoder.decode(self.encoding.decode_single_token_bytes(token)))
        sys.stdout.flush()

    def close(self):
        print(self.decoder.decode(b"", final=True))


def inference_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def prepare_for_inference(model, device: torch.device):
    model = model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# The sample command of train_gpt.py


def add_sample_arguments(parser):
    """The sample command's arguments (safeguards.sampling_arguments_problem checks them)."""
    parser.add_argument("--checkpoint", required=True, help="checkpoints/<run-id>/state_step<N>.pt")
    parser.add_argument("--prompt", action="append", help="prompt text (repeat for a batch of prompts)")
    parser.add_argument("--prompts-file", help="a file of prompts, one per line")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=50, help="0 for no top-k cut")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--no-graph", action="store_true", help="decode eagerly instead of replaying a CUDA graph")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA; faster)")
    parser.add_argument("--bpe-file", help="local GPT-2 ranks file in tiktoken's format, to work offline")


def sample_from(model, checkpoint: dict, args) -> int:
    """The sample command on a checkpoint's model: encode the prompts, generate, print the text (streamed
    as it is sampled when there is one sample); 1 when GPT-2's encoding cannot be loaded."""
    try:
        encoding = load_gpt2_encoding(args.bpe_file)
    except Exception as err:
        print(f"error: cannot load tiktoken's GPT-2 encoding ({type(err).__name__}); "
              "offline, set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached GPT-2 files, or pass "
              "--bpe-file PATH to a GPT-2 ranks file in tiktoken's format (e.g. gpt2.tiktoken)", file=sys.stderr)
        return 1
    texts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file) as f:
            texts += [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        texts = [""]
    device = inference_device()
    model = prepare_for_inference(model, device)
    use_graph = device.type == "cuda" and not args.no_graph
    prompts = [[BOS] + encoding.encode_ordinary(text) for text in texts for _ in range(args.num_samples)]
    stream = TextStream(encoding) if len(prompts) == 1 else None
    print(f"checkpoint step {checkpoint['step']}, {model.config.attention} attention; device {device}, "
          f"CUDA graph {'on' if use_graph else 'off'}", file=sys.stderr)
    if stream is not None:
        sys.stdout.write(texts[0])
    result = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      seed=args.seed, use_graph=use_graph, use_compile=args.compile and device.type == "cuda",
                      on_token=stream.write if stream is not None else None)
    if stream is not None:
        stream.close()
    else:
        for i, tokens in enumerate(result.tokens):
            print(f"---- sample {i + 1} (prompt {i // args.num_samples + 1}) ----")
            print(texts[i // args.num_samples] + encoding.decode(tokens))
    new_tokens = sum(map(len, result.tokens))
    print(f"{new_tokens} tokens in {result.decode_s:.2f}s: {new_tokens / result.decode_s:.0f} tokens/s "
          f"(after a {1000 * result.prefill_s:.0f} ms prefill)", file=sys.stderr)
    return 0
