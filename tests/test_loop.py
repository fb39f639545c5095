"""The training loop's structure: the epoch methods and the callback hooks (tests and extensions hook in here,
never through code in the production loop)."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

from common import SMALL_MODEL, TINY_DEMO  # noqa: E402

import trainer
from main import main

ROOT = Path(__file__).resolve().parents[1]
# 608 samples, batch 100, 2 accumulation steps: 7 micro-batches and 4 optimizer steps per epoch.
TRAIN = ["--mode=train", "--dataset=demo", "--epoch=2", "--batch_size=100", "--grad_accum_steps=2", *TINY_DEMO,
         *SMALL_MODEL]


class Recorder(trainer.Callback):
    def __init__(self):
        self.events = []

    def on_train_start(self, t, run):
        self.events.append(("start", run.state.epoch, run.steps_per_epoch))

    def on_epoch_start(self, t, epoch):
        self.events.append(("epoch", epoch))

    def on_step_start(self, t, step):
        self.events.append(("step", step))

    def on_epoch_end(self, t, epoch, record):
        self.events.append(("end", epoch, record["epoch"], "auc" in record))


def test_callbacks_see_every_epoch_micro_batch_and_record(tmp_path):
    rec = Recorder()
    out = main([*TRAIN, f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'runs'}"], callbacks=[rec])
    steps = [e[1] for e in rec.events if e[0] == "step"]
    # on_step_start runs before every micro-batch with the optimizer steps done so far: 2 per step, the 4th step
    # of each epoch has 1 (7 micro-batches).
    assert steps == [0, 0, 1, 1, 2, 2, 3] + [4, 4, 5, 5, 6, 6, 7]
    assert [e for e in rec.events if e[0] != "step"] == [
        ("start", 0, 4), ("epoch", 1), ("end", 1, 1, True), ("epoch", 2), ("end", 2, 2, True)]
    assert [h["epoch"] for h in out["history"]] == [1, 2]


def test_the_loop_is_start_then_per_epoch_train_evaluate_save():
    """`_train` reads as the loop it is: a short method of named steps, each its own method."""
    src = inspect.getsource(trainer.Trainer._train)
    assert len(src.splitlines()) <= 15, src
    for step in ("_start", "_train_epoch", "_evaluate_epoch", "_save_epoch", "_finish"):
        assert f"self.{step}(" in src and hasattr(trainer.Trainer, step)
    # no test hook in production code: the loop reads no environment variable
    for module in ("trainer.py", "devices.py"):
        assert "os.environ" not in (ROOT / module).read_text(), module


def test_a_callback_that_kills_the_process_ends_the_run_before_its_step(tmp_path):
    """tests/crash_main.py (used by the torchrun test of a dead rank) in one process."""
    proc = subprocess.run([sys.executable, "tests/crash_main.py", "0:5", *TRAIN, f"--data_dir={tmp_path / 'd'}",
                           f"--output_dir={tmp_path / 'runs'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 13, proc.stderr[-2000:]
    assert "rank 0: dying at step 5" in proc.stderr
    log = json.loads((next((tmp_path / "runs").rglob("dev_log.jsonl"))).read_text().splitlines()[0])
    assert log["epoch"] == 1  # epoch 1 (steps 1-4) finished and was saved; it died in epoch 2
