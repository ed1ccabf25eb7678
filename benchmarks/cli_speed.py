"""How long the command line takes to answer, against ``python -c "import torch"``.

Each command runs ``--repeat`` times in a fresh interpreter (the first run of each is a warm-up
of the file cache and not counted); the table gives the median wall time, the median CPU time
(user + system of the child: less sensitive to other work on a shared machine) and both as a
multiple of ``import torch``'s. The target for ``mocolab pretrain --help`` and
``--method NAME --help`` is at most 0.3x ``import torch``: they read the methods from their
sources (:mod:`mocolab.catalog`) and import no torch.

Usage: python benchmarks/cli_speed.py [--repeat 7] [--method dino]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date


def run_once(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``python argv`` in a fresh interpreter."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], stdout=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def measure(argv: list[str], repeat: int) -> tuple[float, float]:
    run_once(argv)  # warm-up
    runs = [run_once(argv) for _ in range(repeat)]
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per command")
    parser.add_argument("--method", default="dino", help="the method of --method NAME --help")
    args = parser.parse_args()

    import torch

    commands = {
        'python -c "import torch"': ["-c", "import torch"],
        "mocolab --help": ["-m", "mocolab", "--help"],
        "mocolab --version": ["-m", "mocolab", "--version"],
        "mocolab pretrain --help": ["-m", "mocolab", "pretrain", "--help"],
        f"mocolab pretrain --method {args.method} --help": [
            "-m",
            "mocolab",
            "pretrain",
            "--method",
            args.method,
            "--help",
        ],
    }
    results = {name: measure(argv, args.repeat) for name, argv in commands.items()}
    torch_wall, torch_cpu = results['python -c "import torch"']
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}; median of {args.repeat} runs "
        f"after a warm-up; load average {load:.1f} when done\n"
    )
    print("| command | wall s | × import torch | CPU s | × import torch |")
    print("|---|---:|---:|---:|---:|")
    for name, (wall, cpu) in results.items():
        print(
            f"| `{name}` | {wall:.3f} | {wall / torch_wall:.2f} | {cpu:.3f} | "
            f"{cpu / torch_cpu:.2f} |"
        )


if __name__ == "__main__":
    main()
