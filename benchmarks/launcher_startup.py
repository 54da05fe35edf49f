"""Cold-start time of `launcher validate` next to `python -c pass`, in one run.

Prints one line per figure; the goal is a launcher cold start of at most 0.5 s.
Usage: python benchmarks/launcher_startup.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = (
    Path(__file__).parent.parent
    / "tests"
    / "data"
    / "invoke_samples"
    / "sd_lora_pokemon_1x8gb.yaml"
)


def best_of(cmd: list[str], repeat: int) -> tuple[float, float]:
    """Return (median, min) wall-clock seconds of running `cmd` `repeat` times."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    python = [sys.executable]
    figures = {
        "python -c pass": best_of([*python, "-c", "pass"], args.repeat),
        "launcher --help": best_of([*python, "-m", "launcher", "--help"], args.repeat),
        "launcher validate": best_of(
            [*python, "-m", "launcher", "validate", str(CONFIG)], args.repeat
        ),
    }
    base = figures["python -c pass"][0]
    for name, (median, fastest) in figures.items():
        print(
            f"{name:20s} median {median:.3f} s  min {fastest:.3f} s  "
            f"ratio to python {median / base:.1f}x"
        )
    validate = figures["launcher validate"][0]
    print(
        f"launcher validate cold start {validate:.3f} s (goal <= 0.5 s: "
        f"{'met' if validate <= 0.5 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
