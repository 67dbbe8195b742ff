"""How long does ``autopeft search --backbone <hub id>`` take to fail on a machine without internet?

Runs the CLI in a fresh process (``HF_HUB_OFFLINE`` unset, as a user's shell) with a hub id that is
not in the local cache and prints its wall time, exit status and output. The target is under 5 s
with one ``error:`` line; the check behind it is :func:`autopeft.backbones.hub_reachable`
(a TCP connection to the hub within 1.5 s, else the local cache only). ``--raw`` also times
huggingface_hub on its own (``hf_hub_download`` of the id's ``config.json``), which retries five times
with back-off before it gives up.

    python benchmarks/offline_backbone.py [--raw]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HUB_ID = "autopeft-bench/does-not-exist"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", action="store_true", help="also time huggingface_hub alone (~25 s offline)")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    cli = [sys.executable, "-m", "autopeft.cli", "search", "--task", "sst2", "--budget", "0.5%", "--backbone", HUB_ID,
           "--output-dir", str(Path("/tmp") / "autopeft-offline-bench")]
    t0 = time.perf_counter()
    res = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=300)
    wall = time.perf_counter() - t0
    out = (res.stdout + res.stderr).strip().splitlines()
    print(f"autopeft search --backbone {HUB_ID}: {wall:.1f} s, exit {res.returncode}, {len(out)} line(s)")
    for line in out:
        print(f"  {line}")
    if args.raw:
        code = ("from huggingface_hub import hf_hub_download\n"
                f"try:\n    hf_hub_download({HUB_ID!r}, 'config.json')\nexcept Exception as e:\n    print(type(e).__name__)")
        t0 = time.perf_counter()
        raw = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        print(f"huggingface_hub alone: {time.perf_counter() - t0:.1f} s ({raw.stdout.strip()})")
    return 0 if wall < 5 and res.returncode == 2 and len(out) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
