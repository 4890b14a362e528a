"""Start-up time of the CLI: `--help`, and a config error (which must import Lightning to check
the model's arguments). Median wall time of --repeats runs each.

    .venv/bin/python bench/bench_startup.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "--help": ["--help"],
    "fit --help (config first)": ["fit", "--config", "configs/quickstart.yaml", "--help"],
    "config error (--model.lrr=1)": ["fit", "--config", "configs/vgg_bn.yaml", "--model.lrr=1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name, argv in COMMANDS.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "bnstudy", *argv], cwd=REPO,
                           capture_output=True)
            times.append(time.perf_counter() - start)
        print(f"{name:32s} median {statistics.median(times):6.2f} s  "
              f"(min {min(times):.2f}, max {max(times):.2f}, {args.repeats} runs)")


if __name__ == "__main__":
    main()
