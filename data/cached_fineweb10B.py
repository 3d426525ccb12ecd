"""Download the GPT-2 tokens of FineWeb10B from the Hugging Face hub (an hour saved over tokenizing).

    python data/cached_fineweb10B.py        # the val shard and the first 8 train shards (800M tokens)
    python data/cached_fineweb10B.py 103    # all of FineWeb10B

Shards land in data/fineweb10B/ next to this script (or --dir). A shard already there whose header
and size check out is skipped; a corrupt or incomplete one is removed and fetched again. An
interrupted download resumes where it stopped: huggingface-hub keeps the partial file under
<dir>/.cache/huggingface/ and continues it on the next run.
"""

import argparse
import os
import sys

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.utils import logging as hub_logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the shard format's module
from gpt2_data import read_shard_header  # noqa: E402

HUB_REPO = "kjj0/fineweb10B-gpt2"
MAX_TRAIN_SHARDS = 103  # FineWeb10B: ~100M tokens per train shard
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb10B")

# Errors that mean "the hub cannot be reached". Without a connection (or with HF_HUB_OFFLINE=1)
# hf_hub_download raises LocalEntryNotFoundError; a connection lost mid-transfer surfaces as a
# transport error of the HTTP client (httpx since huggingface-hub 1.0).
HUB_UNREACHABLE = (LocalEntryNotFoundError, ConnectionError, TimeoutError)
try:
    import httpx
    HUB_UNREACHABLE += (httpx.TransportError,)
except ImportError:
    pass


def shard_names(num_train):
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train + 1)]


def download_shards(num_train, out_dir):
    """Fetch the val shard and the first num_train train shards into out_dir; return their paths.

    Raises the hub's errors (see HUB_UNREACHABLE) and ValueError for a shard that arrives corrupt.
    """
    os.makedirs(out_dir, exist_ok=True)
    names = shard_names(num_train)
    paths = []
    for i, name in enumerate(names, start=1):
        path = os.path.join(out_dir, name)
        progress = f"[{i}/{len(names)}] {name}"
        if os.path.exists(path):
            try:
                print(f"{progress}: complete ({read_shard_header(path):,} tokens), skipped", flush=True)
                paths.append(path)
                continue
            except ValueError as err:
                print(f"{progress}: {err}; downloading it again", flush=True)
                os.remove(path)
        print(f"{progress}: downloading", flush=True)
        hf_hub_download(repo_id=HUB_REPO, filename=name, repo_type="dataset", local_dir=out_dir)
        print(f"{progress}: done ({read_shard_header(path):,} tokens)", flush=True)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download FineWeb10B GPT-2 token shards from the Hugging Face hub.")
    parser.add_argument("num_train", nargs="?", type=int, default=8,
                        help=f"number of train shards of ~100M tokens each, 0 to {MAX_TRAIN_SHARDS} (default 8)")
    parser.add_argument("--dir", default=DEFAULT_DIR,
                        help="where to put the shards (default: fineweb10B/ next to this script)")
    args = parser.parse_args(argv)
    if not 0 <= args.num_train <= MAX_TRAIN_SHARDS:
        parser.error(f"num_train must be between 0 and {MAX_TRAIN_SHARDS}, got {args.num_train}")

    # The hub logs a warning per connection retry; when it gives up, the one line below says it all.
    hub_logging.set_verbosity_error()
    try:
        download_shards(args.num_train, args.dir)
    except HUB_UNREACHABLE as err:
        print(f"error: the Hugging Face hub is unreachable ({type(err).__name__}); rerun when online (partial "
              f"downloads resume), copy the shards into {args.dir}, or train on other shards through the "
              f"TRAIN_FILES and VAL_FILES glob patterns of train_gpt.py", file=sys.stderr)
        return 1
    except (HfHubHTTPError, ValueError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"FineWeb shards ready in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
