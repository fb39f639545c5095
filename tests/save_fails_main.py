"""Launch main.py under torchrun with rank 0's checkpoint writes (training) and records writes (--mode=dev/test)
failing as on a full disk: `torchrun ... tests/save_fails_main.py <main.py flags>`. The patch is applied here, before `main.cli` runs, so the
production code holds no test code."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main  # noqa: E402
import trainer  # noqa: E402


def _disk_full(path, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


if __name__ == "__main__":
    if os.environ.get("RANK") == "0":
        trainer.save_checkpoint = _disk_full
        main.write_evaluation = _disk_full
    sys.exit(main.cli(sys.argv[1:]))
