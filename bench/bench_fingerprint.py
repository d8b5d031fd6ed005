"""Fingerprint throughput on the real SmolLM2 safetensors, against `sha256sum` of the same files in the same run.

`sha256sum` (GNU coreutils) hashes in portable C; `openssl dgst -sha256`, when installed, uses the same
SHA extensions as Python's hashlib, so it is the like-for-like peer and is printed beside it.

Both read from the page cache (one warm-up read first), so the figures compare hashing, not the disk. The
fingerprint cache is bypassed (use_cache=False) for the cold figure; the cached figure is a stat-only hit.

    .venv/bin/python bench/bench_fingerprint.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hub.fingerprint import fingerprint_model, fingerprint_path  # noqa: E402
from hub.runtime.pretrained import smollm2_path  # noqa: E402


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    # The same converted folder the tests use, so the bench does not convert a second copy.
    folder = smollm2_path(cache_dir=Path(os.environ.get("HUB_TEST_CACHE", ROOT / ".cache")))
    files = sorted(folder.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    for file in files:  # warm the page cache for both contenders
        with open(file, "rb") as handle:
            while handle.read(64 << 20):
                pass

    ours = [_timed(lambda: fingerprint_path(folder, use_cache=False)) for _ in range(args.repeat)]
    theirs = [_timed(lambda: _run("sha256sum", *map(str, files))) for _ in range(args.repeat)]
    openssl = shutil.which("openssl")
    peer = [_timed(lambda: _run(openssl, "dgst", "-sha256", *map(str, files)))
            for _ in range(args.repeat if openssl else 0)]
    with tempfile.TemporaryDirectory() as cache:
        fingerprint_path(folder, cache_dir=Path(cache))
        cached = [_timed(lambda c=cache: fingerprint_path(folder, cache_dir=Path(c))) for _ in range(args.repeat)]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    from_model = [_timed(lambda: fingerprint_model(model)) for _ in range(args.repeat)]

    def gbps(times: list[float]) -> float:
        return size / statistics.median(times) / 1e9

    print(f"SmolLM2-135M-Instruct safetensors: {size / 1e9:.3f} GB in {len(files)} file(s); median of {args.repeat}")
    print(f"fingerprint_path (cold, cache bypassed): {gbps(ours):6.2f} GB/s  ({statistics.median(ours):.3f} s)")
    print(f"sha256sum                              : {gbps(theirs):6.2f} GB/s  ({statistics.median(theirs):.3f} s)")
    print(f"ratio fingerprint_path / sha256sum     : {gbps(ours) / gbps(theirs):6.2f}x")
    if openssl:
        print(f"openssl dgst -sha256                   : {gbps(peer):6.2f} GB/s  ({statistics.median(peer):.3f} s)")
        print(f"ratio fingerprint_path / openssl       : {gbps(ours) / gbps(peer):6.2f}x")
    print(f"fingerprint_model (loaded model)       : {gbps(from_model):6.2f} GB/s  "
          f"({statistics.median(from_model):.3f} s)")
    print(f"fingerprint_path (cache hit)           : {statistics.median(cached) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
