"""Launch main.py with a rank that dies: `python tests/crash_main.py RANK:STEP <main.py flags>` (or under torchrun).

Rank RANK ends abruptly (os._exit, no cleanup, as a killed process would) before optimizer step STEP + 1. The hook
is a `trainer.Callback` given to `main.cli`, so the production loop holds no test code.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from main import cli  # noqa: E402
from trainer import Callback  # noqa: E402


class DieAtStep(Callback):
    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_start(self, trainer, step: int) -> None:
        if trainer.runtime.rank == self.rank and step >= self.step:
            print(f"rank {self.rank}: dying at step {step}", file=sys.stderr, flush=True)
            os._exit(13)


if __name__ == "__main__":
    rank, _, step = sys.argv[1].partition(":")
    sys.exit(cli(sys.argv[2:], callbacks=[DieAtStep(int(rank), int(step or 0))]))
