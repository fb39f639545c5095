"""bench/gpu.py, the one-command check of a GPU machine: its --smoke mode runs the same rows on the CPU at toy sizes,
so the script is known to work before the (rare) GPU run. Also the test-device helper of tests/common.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common import DEVICE_ENV, model_device

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu  # noqa: E402

# What the CPU cannot run: fp16 needs the CUDA GradScaler (bf16 autocast runs on the CPU, at toy size, and is checked).
SKIPPED_ON_CPU = {f"amp-fp16-{name}" for name in gpu.AMP_MODELS}


def planned() -> list[tuple[str, str]]:
    """(key, section) of every row of bench/gpu.py, in order (the plan needs no corpus or GPU)."""
    ctx = gpu.Context(SimpleNamespace(device="cpu", data_dir="unused", out="unused", smoke=True), gpu.SMOKE)
    return [(key, section) for key, section, *_ in gpu.plan(ctx)]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-smoke")
    cmd = [sys.executable, "bench/gpu.py", "--smoke", f"--out={tmp / 'out'}", f"--data_dir={tmp / 'data'}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    return p, tmp / "out"


def test_smoke_runs_every_row_and_the_correctness_rows_pass(smoke):
    p, out = smoke
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    data = json.loads((out / "gpu.json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    sections = dict(planned())
    assert list(rows) == list(sections)  # every row, in the planned order
    for key, r in rows.items():
        section = sections[key]
        if key in SKIPPED_ON_CPU:
            assert r["status"] == "skipped: no CUDA", r
        elif section == "correctness":
            assert r["status"] == "pass", r
        elif section == "setup":
            assert r["status"] == "done", r
        else:  # speed rows: measured against their goal (toy sizes on a CPU miss them), never failed or skipped
            assert r["status"] == "measured" or r["status"] == "met" or r["status"].startswith("missed"), r
    # bf16 autocast really ran: a finite loss that went down, logits close to fp32
    for name in gpu.AMP_MODELS:
        amp = rows[f"amp-bf16-{name}"]["data"]
        assert amp["finite"] and amp["last"] < amp["first"] and amp["logit_rel_diff"] <= gpu.AMP_RTOL["bf16"]
    plm = rows["speed-plm-full"]["data"]
    assert plm["tflops"] > 0 and plm["slots_per_step"] > 0 and plm["epoch_s"] > 0
    assert rows["speed-plm-frozen"]["data"]["cache_s"] is not None  # the frozen-layer cache was built
    assert "total wall time" in p.stdout
    assert data["header"]["total_seconds"] > 0


def test_smoke_output_folder_is_small_and_flat(smoke):
    p, out = smoke
    files = sorted(x.name for x in out.iterdir())
    assert len(files) <= 6 and all((out / f).is_file() for f in files), files
    assert {"gpu.md", "gpu.json"} <= set(files)
    md = (out / "gpu.md").read_text()
    data = json.loads((out / "gpu.json").read_text())
    assert md.count("\n| ") == len(data["rows"]) + 1  # the header and one line per row
    assert "profile.txt" in files  # CPU speeds miss the goals: the profiler summary was written


def test_budget_and_deadline_skip_the_rows_not_yet_started(tmp_path, capsys, monkeypatch):
    """--budget 0: speed rows are 'skipped: budget' and correctness rows still run; --deadline 0: every row is
    'skipped: deadline'. (In this process: --threads=0 keeps torch's thread count for the tests that follow.)"""
    import transformers

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # main sets it: restored after the test
    verbosity = transformers.logging.get_verbosity()
    common = ["--smoke", "--threads=0", f"--out={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}"]
    try:
        code = gpu.main([*common, "--budget=0", "--rows=speed-nrms,speed-compile,amp-fp16-NRMS"])
        rows = json.loads((tmp_path / "out" / "gpu.json").read_text())["rows"]
        assert code == 0 and [r["key"] for r in rows] == ["speed-nrms", "speed-compile", "amp-fp16-NRMS"]
        assert [r["status"] for r in rows] == ["skipped: budget", "skipped: budget", "skipped: no CUDA"]
        assert "total wall time" in capsys.readouterr().out
        gpu.main([*common, "--deadline=0", "--rows=setup-check,amp-fp16-NRMS"])
        rows = json.loads((tmp_path / "out" / "gpu.json").read_text())["rows"]
        assert [r["status"] for r in rows] == ["skipped: deadline", "skipped: deadline"]
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def test_plm_flops_count_every_layer_three_times_when_trained():
    """The FLOP formula of the speed rows: per call of the PLM on [N, l] token slots, each layer costs
    2 * P_layer * N * l + 4 * N * l^2 * d forward, three times that when it trains."""
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32))
    # what PLMFlops reads of a PLM news encoder: the PLM, its layer stack and where the stack lives
    enc = SimpleNamespace(plm=bert, _all_layers=bert.encoder.layer, _layers_parent=bert.encoder, _layers_attr="layer")
    for p in bert.encoder.layer[0].parameters():
        p.requires_grad = False
    counter = gpu.PLMFlops(enc)
    counter.active = True
    ids = torch.randint(1, 20, (5, 7))
    bert(input_ids=ids, attention_mask=torch.ones_like(ids))
    p_layer = sum(p.numel() for p in bert.encoder.layer[0].parameters())
    forward = 2 * p_layer * 5 * 7 + 4 * 5 * 7 * 7 * 16
    assert counter.layer_params == p_layer and counter.slots == 35 and counter.calls == 1
    assert counter.flops == forward * (1 + 3 + 3)  # layer 0 frozen, layers 1 and 2 trained
    with torch.no_grad():
        bert(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert counter.flops == forward * (1 + 3 + 3) + forward * 3  # no gradient: every layer once
    counter.close()
    bert(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert counter.calls == 2


def test_peak_table_matches_variants_before_the_base_name():
    assert gpu.bf16_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.bf16_peak("NVIDIA H100 PCIe") == 756.0
    assert gpu.bf16_peak("NVIDIA H200") == 989.0
    assert gpu.bf16_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.bf16_peak("Some Future GPU") is None


def test_model_device_reads_the_environment(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert model_device() == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert model_device() == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "gpu0")
    with pytest.raises(ValueError, match=f"{DEVICE_ENV}='gpu0' is not a device"):
        model_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv(DEVICE_ENV, "cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            model_device()
