"""nanoGPT, the peer, run as a separate process in the same sitting (never imported, never copied).

The unmodified code lies in ``../shared/baselines/nanoGPT``; it is copied to a temporary directory with
``tinyshakespeare.txt`` as its ``input.txt`` (so ``prepare.py`` downloads nothing), prepared, and run with
its README's documented CPU command line. Its log gives the per-iteration times (``iter N: loss L, time
T ms``: the whole iteration, batch building included) and val losses (nats per character, which for
this ASCII text is nats per byte).

    python benchmarks/nanogpt_peer.py --max-iters 50      # prints the peer's JSON alone
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BASELINE = SHARED / "baselines" / "nanoGPT"
DATA = SHARED / "data" / "tinyshakespeare.txt"
BATCH, BLOCK = 12, 64  # the documented CPU run's shape (4L/4H/128d)
_ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")
_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def unavailable(data: Path = DATA) -> str | None:
    """Why the peer cannot run here, or None."""
    if not (BASELINE / "train.py").is_file():
        return f"nanoGPT baseline not found at {BASELINE}"
    if not data.is_file():
        return f"{data} not found"
    return None


def documented_command(max_iters: int) -> list[str]:
    """nanoGPT README's CPU example, with ``max_iters`` (2000 documented)."""
    return [
        "config/train_shakespeare_char.py",
        "--device=cpu",
        "--compile=False",
        "--eval_iters=20",
        "--log_interval=1",
        f"--block_size={BLOCK}",
        f"--batch_size={BATCH}",
        "--n_layer=4",
        "--n_head=4",
        "--n_embd=128",
        f"--max_iters={max_iters}",
        f"--lr_decay_iters={max_iters}",
        "--dropout=0.0",
    ]


def run_nanogpt(data: Path = DATA, max_iters: int = 2000, timeout: float = 1800) -> dict:
    """Run the peer once; its tokens/s (median iteration), wall time and final val bits per byte."""
    reason = unavailable(data)
    if reason:
        raise FileNotFoundError(reason)
    with tempfile.TemporaryDirectory(prefix="nanogpt-peer-") as tmp:
        root = Path(tmp) / "nanoGPT"
        shutil.copytree(BASELINE, root)
        for p in [root, *root.rglob("*")]:  # the shared copy is read-only
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
        prep = root / "data" / "shakespeare_char"
        shutil.copyfile(data, prep / "input.txt")
        subprocess.run([sys.executable, "prepare.py"], cwd=prep, check=True, capture_output=True, timeout=300)
        cmd = [sys.executable, "train.py", *documented_command(max_iters), f"--out_dir={Path(tmp) / 'out'}"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"nanoGPT exited with {done.returncode}:\n{done.stderr[-2000:]}")
    iters = [float(m[3]) / 1e3 for line in done.stdout.splitlines() if (m := _ITER.match(line))]
    evals = [(int(m[1]), float(m[3])) for line in done.stdout.splitlines() if (m := _EVAL.match(line))]
    if not iters or not evals:
        raise RuntimeError(f"could not read nanoGPT's log:\n{done.stdout[-2000:]}")
    timed = iters[1:] or iters  # the first iteration also builds and warms everything
    median = statistics.median(timed)
    val_loss = evals[-1][1]
    return {
        "command": "python train.py " + " ".join(documented_command(max_iters)),
        "max_iters": max_iters,
        "tokens_per_iter": BATCH * BLOCK,
        "iter_ms_median": median * 1e3,
        "tokens_per_s": BATCH * BLOCK / median,
        "wall_s": wall,
        "final_val_loss_nats_per_char": val_loss,
        "val_bpb": val_loss / math.log(2),
        "val_estimate": "mean over eval_iters=20 random val batches (nanoGPT's estimate_loss)",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--max-iters", type=int, default=2000)
    args = p.parse_args()
    print(json.dumps(run_nanogpt(args.data, args.max_iters), indent=2))


if __name__ == "__main__":
    main()
