"""How long `lqtk --help` takes (a new process each time, as a user runs it): median of 5 runs, beside the time of a
bare `python -c pass` and `lqtk fit --help` (which loads Lightning and the phases to list their options).

    python scripts/help_time.py
"""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {"python -c pass": [sys.executable, "-c", "pass"],
            "lqtk --help": [sys.executable, "-m", "lqtk.cli", "--help"],
            "lqtk fit --help": [sys.executable, "-m", "lqtk.cli", "fit", "--help"]}


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parent.parent)
    return time.perf_counter() - start


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    print(f"{cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    for name, command in COMMANDS.items():
        runs = [seconds(command) for _ in range(5)]
        print(f"{name:18s} median {statistics.median(runs):.2f} s  (runs: {', '.join(f'{t:.2f}' for t in runs)})")


if __name__ == "__main__":
    main()
