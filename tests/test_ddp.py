"""Distributed training and evaluation: 2 processes on gloo (CPU) launched with torchrun's CLI give what one
process gives; a dead rank ends the job; batch sharding, AMP selection and the batch-size rule.

The torchrun runs share one tiny generated corpus (built in-process first, so the ranks only read its cache)
and use 127.0.0.1 with a free port only. Each launch is bounded by a subprocess timeout: a hang fails the test.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import devices
import run_records
import significance
import trainer
import util
from main import main

from common import SMALL_MODEL, TINY_DEMO, torchrun, train_pairings_under_ddp  # noqa: E402

# 608 training samples: global batch 100 with 2 accumulation steps -> 7 micro-batches (the last holds 8 samples)
# and 4 optimizer steps, the last with one micro-batch: every branch of the loop (no_sync, partial batch) runs.
# Dropout 0: the runs must differ only by float rounding. lr 1e-3 makes a data bug move weights far beyond it.
TRAIN = ["--mode=train", "--dataset=demo", "--epoch=1", "--batch_size=100", "--grad_accum_steps=2",
         "--dropout_rate=0", "--lr=1e-3", "--log_every=2", *TINY_DEMO, *SMALL_MODEL]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process and two processes trained from the same seed on the same data."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = [f"--data_dir={tmp / 'data'}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run with OMP_NUM_THREADS=1: the same kernels, so only the split differs
    try:
        one = main([*TRAIN, *data, f"--output_dir={tmp / 'one'}"])
    finally:
        torch.set_num_threads(threads)
    proc = torchrun([*TRAIN, *data, f"--output_dir={tmp / 'two'}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two_dir = tmp / "two" / "demo" / "MHSA-MHSA" / "#1"
    return tmp, data, one, two_dir, proc


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    tmp, data, one, two_dir, proc = runs
    a = torch.load(Path(one["run_dir"]) / checkpoints.LAST_CHECKPOINT, weights_only=True)
    b = torch.load(two_dir / checkpoints.LAST_CHECKPOINT, weights_only=True)
    assert a["step"] == b["step"] == 4 and b["world_size"] == 2 and len(b["rng"]) == 2
    assert b["history"][0]["train_loss"] == pytest.approx(a["history"][0]["train_loss"], rel=1e-6)
    names = list(a["model"])
    moments = a["optimizer"]["state"]
    compared = 0
    for i, name in enumerate(names):
        # Attention key biases get a mathematically zero gradient (softmax ignores a shift shared by all keys):
        # Adam turns the float noise left there into steps of random sign in both runs. Their first moment shows
        # it; every parameter with a real gradient must match.
        if moments[i]["exp_avg"].abs().max() < 1e-8:
            continue
        torch.testing.assert_close(b["model"][name], a["model"][name], rtol=1e-4, atol=1e-5, msg=name)
        compared += 1
    assert compared >= len(names) - 2
    assert "distributed: 2 processes, backend gloo" in proc.stdout
    # train_log.jsonl (rank 0 only) logs the global batch's loss and the whole job's sample rate
    logs = [run_records.read_jsonl(d / run_records.TRAIN_LOG) for d in (Path(one["run_dir"]), two_dir)]
    assert [(r["kind"], r["step"]) for r in logs[1]] == [(r["kind"], r["step"]) for r in logs[0]] == [
        ("step", 2), ("step", 4), ("epoch", 4)]
    loss = [[r["loss"] if r["kind"] == "step" else r["train_loss"] for r in log] for log in logs]
    assert loss[1] == pytest.approx(loss[0], rel=1e-5)
    assert json.loads((two_dir / run_records.ENVIRONMENT).read_text())["world_size"] == 2


def test_sharded_dev_evaluation_during_training_equals_one_process(runs):
    tmp, data, one, two_dir, proc = runs
    logged = [line for line in (two_dir / "dev_log.jsonl").read_text().splitlines()]
    assert len(logged) == 1
    sharded = json.loads(logged[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran with OMP_NUM_THREADS=1: same kernels, same rounding
    try:
        single = main(["--mode=dev", f"--dev_model_path={two_dir / 'MHSA-MHSA'}", *data, "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    for key in ("auc", "mrr", "ndcg5", "ndcg10", "impressions"):
        assert sharded[key] == single["metrics"][key], key


def test_sharded_test_prediction_is_identical_to_one_process(runs, tmp_path):
    tmp, data, one, two_dir, proc = runs
    ckpt = Path(one["checkpoint"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = main(["--mode=test", f"--test_model_path={ckpt}", *data, "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    out = ckpt.parent / "test"
    saved = tmp_path / "single"
    shutil.copytree(out, saved)
    shutil.rmtree(out)
    proc = torchrun(["--mode=test", f"--test_model_path={ckpt}", *data, "--no-progress"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "prediction.txt").read_bytes() == (saved / "prediction.txt").read_bytes()
    assert (out / "prediction.zip").exists()
    sharded = json.loads((out / "metrics.json").read_text())["metrics"]
    for key in ("auc", "mrr", "ndcg5", "ndcg10", "impressions", "skipped_single_class"):
        assert sharded[key] == single["metrics"][key], key
    # prediction, truth, the model's and the popularity baseline's per-impression records, metrics.json (issue 22:
    # dev/test list every file they write) and the beyond-accuracy records (issue 23), by rank 0 only
    assert proc.stdout.count("wrote ") == 6
    for name in (significance.PER_IMPRESSION, significance.POPULARITY):
        np.testing.assert_array_equal(significance.load_per_impression(out / name).metrics,
                                      significance.load_per_impression(saved / name).metrics)
    import beyond_accuracy

    beyond, beyond_single = (beyond_accuracy.load_records(f / beyond_accuracy.RECORDS) for f in (out, saved))
    assert beyond["metrics"].keys() == beyond_single["metrics"].keys()
    for key, values in beyond["metrics"].items():
        np.testing.assert_array_equal(values, beyond_single["metrics"][key])


def test_a_dead_rank_ends_the_job_with_an_error(tmp_path, runs):
    _, data, _, _, _ = runs
    proc = torchrun([*TRAIN, "--epoch=2", *data, f"--output_dir={tmp_path / 'crash'}"],
                    script=["tests/crash_main.py", "1:1"], timeout=90)
    assert proc.returncode != 0
    assert "dying at step 1" in proc.stderr
    assert not list((tmp_path / "crash").rglob(checkpoints.LAST_CHECKPOINT))  # it died in epoch 1


def test_a_write_error_on_rank_0_stops_every_rank_with_one_line_each(tmp_path, runs):
    """Rank 0 writes the checkpoints; when that fails (a full disk), the other ranks learn it from rank 0 at the
    end of the epoch and stop with one line each, instead of a traceback from the broken collective (or a wait until
    --dist_timeout where the launcher does not stop them)."""
    _, data, _, _, _ = runs
    proc = torchrun([*TRAIN, *data, f"--output_dir={tmp_path / 'full'}"], script=["tests/save_fails_main.py"],
                    timeout=120)
    assert proc.returncode != 0
    assert "error (rank 0): cannot write the run's records" in proc.stderr, proc.stderr[-3000:]
    # (torchrun's own report of a failed worker has a traceback of the launcher: not the ranks')
    assert "[rank1]: Traceback" not in proc.stderr and "error (rank 1): rank 0 stopped" in proc.stderr, \
        proc.stderr[-3000:]


def test_a_records_write_error_on_rank_0_in_dev_stops_every_rank_with_one_line_each(tmp_path, runs):
    """--mode=dev/test under torchrun: rank 0 measures and writes the records while the others wait; when writing
    fails (a full disk), the others stop with one line each, not a traceback from the broken barrier."""
    _, data, _, two_dir, _ = runs
    run = tmp_path / "run"
    shutil.copytree(two_dir, run)
    proc = torchrun(["--mode=dev", f"--dev_model_path={run / 'MHSA-MHSA'}", *data, "--no-progress"],
                    script=["tests/save_fails_main.py"], timeout=120)
    assert proc.returncode != 0
    assert "error (rank 0): cannot write the dev records" in proc.stderr, proc.stderr[-3000:]
    assert "[rank1]: Traceback" not in proc.stderr and "error (rank 1): rank 0 stopped writing the dev records" \
        in proc.stderr, proc.stderr[-3000:]


def test_global_batches_are_split_exactly_whatever_the_world_size():
    """The ranks' parts of each global batch are the one-process batch, and the loss weights make DDP's mean of
    per-rank mean gradients equal the global batch mean, also when the last batch leaves a rank empty."""
    n, batch = 23, 6  # last global batch: 5 samples
    x = np.random.default_rng(0).random(n)
    single = list(trainer.GlobalBatchSampler(n, batch, seed=3))
    for world in (2, 3, 6):
        parts = [trainer.GlobalBatchSampler(n, batch, seed=3, rank=r, world_size=world) for r in range(world)]
        for s in parts:
            s.set_epoch(0)
        rank_batches = [list(s) for s in parts]
        for i, whole in enumerate(single):
            weights = [s.weight(i) for s in parts]
            got = np.concatenate([rb[i] for rb, w in zip(rank_batches, weights) if w > 0])
            np.testing.assert_array_equal(got, whole)
            ddp_mean = sum(w * x[rb[i]].mean() for rb, w in zip(rank_batches, weights)) / world
            assert ddp_mean == pytest.approx(x[whole].mean(), rel=1e-12)
        assert any(0 in [s.weight(i) for s in parts] for i in range(len(single))) == (world == 6)
    a, b = trainer.GlobalBatchSampler(n, batch, seed=3), trainer.GlobalBatchSampler(n, batch, seed=3)
    b.set_epoch(1)
    assert not all(np.array_equal(p, q) for p, q in zip(a, b))  # a new order every epoch


def test_batch_size_must_divide_by_the_world_size(monkeypatch):
    from config import Config

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"--batch_size=30 is the global batch .* divisible .*=28 or 32"):
        devices.setup_runtime(Config.from_args(["--batch_size=30", "--device=cpu"]))
    assert util.dist_env() == (1, 1, 4)


def test_amp_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert devices.resolve_amp("auto", cpu) == "off"
    warnings = []
    assert devices.resolve_amp("bf16", cpu, log=warnings.append) == "bf16" and "slower" in warnings[0]
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        devices.resolve_amp("fp16", cpu)
    # No GPU here: the dtype choice on CUDA is checked with the capability query stubbed.
    monkeypatch.setattr(devices, "_cuda_has_bf16", lambda device: True)
    assert devices.resolve_amp("auto", cuda) == "bf16"
    monkeypatch.setattr(devices, "_cuda_has_bf16", lambda device: False)
    assert devices.resolve_amp("auto", cuda) == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ValueError, match="V100 has no native bf16"):
        devices.resolve_amp("bf16", cuda)
    rt = devices.Runtime(device=cpu, amp="bf16")
    with rt.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with devices.Runtime(device=cpu).autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def _pairings_with(news: str, extra: str = "") -> list[str]:
    from model import check_pairing
    from userEncoders import USER_ENCODERS

    valid = []
    for user in sorted(USER_ENCODERS):
        try:
            check_pairing(news, user)
        except ValueError:
            continue
        valid.append(f"{news}-{user}" + (f":{extra}" if extra else ""))
    return valid


def test_pairings_with_a_parameter_used_only_sometimes_train_under_ddp(tmp_path):
    """Every pairing of the two families where a trainable parameter could go without a gradient (found by one
    forward/backward of every valid pairing and flag variant, listing parameters whose .grad stays None): PLMMiner's
    category embedding, read only by the MINER user encoder, and DAE's decoder under --Alpha=0 (no reconstruction
    loss). Each takes 2 DDP steps in one 2-process launch (DDP stops at step 2 on an unused parameter)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    plm = tmp_path / "tiny-bert"
    BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=16)).save_pretrained(plm)
    pairings = _pairings_with("PLMMiner") + _pairings_with("DAE", "--Alpha=0")
    assert {"PLMMiner-ATT", "PLMMiner-MHSA", "DAE-GRU:--Alpha=0"} <= set(pairings) and len(pairings) >= 20
    train_pairings_under_ddp(str(plm), pairings)
