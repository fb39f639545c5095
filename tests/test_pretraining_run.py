"""--mode=pretrain end to end: main() pretrain -> train --init_from -> dev -> test on a tiny generated corpus; the
pretraining checkpoint does not depend on dev labels; --init_from loads exactly the encoder weights and refuses a
checkpoint of another architecture; torchrun with 2 gloo processes pretrains like one process with the global batch."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
from main import main
from common import SMALL_MODEL, TINY_DEMO

# dropout 0: the DDP comparison must differ only by float rounding
PRETRAIN = ["--mode=pretrain", "--dataset=demo", "--epoch=2", "--batch_size=50", "--dropout_rate=0", "--lr=1e-3",
            "--pretrain_tasks=contrastive,next_click,mip,map,aap,sp", "--log_every=2", *TINY_DEMO, *SMALL_MODEL]


@contextmanager
def one_thread():
    """A one-process run to compare with torchrun's ranks (OMP_NUM_THREADS=1) or with another in-process run: torch
    with several threads splits reductions by thread (and, under load, not even the same way twice: two 2-thread runs
    of the same pretraining differ), which measured up to the whole tolerance against the 1-thread ranks; with 1
    thread the same kernels run, so only the split of the batch differs (about a sixth of the tolerance)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    common = [f"--data_dir={tmp / 'data'}", f"--output_dir={tmp / 'best_model'}"]
    with one_thread():  # the reference of the comparisons below
        result = main([*PRETRAIN, *common])
    return tmp, common, result


def test_pretraining_writes_its_own_run_folder_with_config_logs_and_checkpoint(pretrained):
    tmp, common, result = pretrained
    run = Path(result["run_dir"])
    assert run == tmp / "best_model" / "demo" / "MHSA-MHSA" / "pretrain#1"
    assert Path(result["checkpoint"]) == run / "MHSA-MHSA"
    saved = json.loads((run / "config.json").read_text())
    assert saved["mode"] == "pretrain" and saved["pretrain_tasks"].startswith("contrastive")
    log = [json.loads(line) for line in (run / "pretrain_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["heldout_loss"])
        assert set(r["heldout"]) == {"contrastive", "next_click", "mip", "map", "aap", "sp"}
    assert result["best_epoch"] == min(log, key=lambda r: r["heldout_loss"])["epoch"]
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert ckpt["model_settings"]["pretrain_tasks"] == ["contrastive", "next_click", "mip", "map", "aap", "sp"]
    assert any(k.startswith("tasks.") for k in ckpt["model"]) and any(k.startswith("user_encoder.") for k in ckpt["model"])
    train_log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    epoch = [r for r in train_log if r["kind"] == "epoch"]
    assert len(epoch) == 2 and set(epoch[0]["aux"]) >= {"contrastive", "mip", "sp"}
    # a second pretraining run gets the next index, and training runs keep their own numbering
    assert not (tmp / "best_model" / "demo" / "MHSA-MHSA" / "#1").exists()


def test_fine_tuning_from_pretraining_then_dev_and_test(pretrained):
    tmp, common, result = pretrained
    train = main(["--mode=train", "--dataset=demo", "--epoch=1", "--batch_size=32", f"--init_from={result['run_dir']}",
                  *TINY_DEMO, *SMALL_MODEL, *common])
    assert Path(train["run_dir"]).name == "#1"
    assert 0 <= train["dev_metrics"]["auc"] <= 1
    dev = main(["--mode=dev", f"--dev_model_path={train['checkpoint']}", *common, "--no-progress"])
    assert dev["metrics"]["auc"] == pytest.approx(train["dev_metrics"]["auc"], abs=1e-9)
    test = main(["--mode=test", f"--test_model_path={train['checkpoint']}", *common, "--no-progress"])
    assert Path(test["prediction"]).is_file()


def build_model(extra=(), tmp=None):
    from config import Config
    from main import load_corpus
    from model import Model

    cfg = Config.from_args(["--mode=train", "--dataset=demo", f"--data_dir={tmp / 'data'}", *TINY_DEMO, *SMALL_MODEL,
                            *extra])
    corpus = load_corpus(cfg, log=lambda *a, **k: None)
    return cfg, Model(cfg, corpus.meta, corpus.news)


def test_init_from_loads_exactly_the_encoder_weights(pretrained):
    from config import architecture_flags
    from pretraining import load_pretrained_encoders

    tmp, common, result = pretrained
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    torch.manual_seed(123)
    cfg, model = build_model(["--click_predictor=mlp"], tmp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = load_pretrained_encoders(model, ckpt, result["checkpoint"], architecture_flags(cfg.values))
    after = model.state_dict()
    encoder = [k for k in after if k.startswith(("news_encoder.", "user_encoder."))]
    assert n.loaded == sorted(encoder) and encoder and n.dropped == []
    for k in after:
        if k in encoder:
            assert torch.equal(after[k], ckpt["model"][k]), k
        else:  # the click predictor (an mlp here) keeps its fresh weights
            assert torch.equal(after[k], before[k]), k
    assert any(k.startswith("click_predictor.") for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in encoder)


def test_init_from_refuses_another_architecture_naming_the_settings(pretrained):
    from config import architecture_flags
    from pretraining import load_pretrained_encoders

    tmp, common, result = pretrained
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    cfg, model = build_model(["--head_num=2", "--attention_dim=8"], tmp)
    with pytest.raises(ValueError, match=r"--attention_dim: checkpoint 16, now 8.*--head_num: checkpoint 4, now 2"):
        load_pretrained_encoders(model, ckpt, result["checkpoint"], architecture_flags(cfg.values))
    # dropout shapes no weight: a different value is not a mismatch
    cfg, model = build_model(["--dropout_rate=0.3"], tmp)
    assert load_pretrained_encoders(model, ckpt, result["checkpoint"], architecture_flags(cfg.values)).loaded
    # through main(): a one-line error naming the setting, before any training
    with pytest.raises(ValueError, match=r"--head_num: checkpoint 4, now 2"):
        main(["--mode=train", "--dataset=demo", "--epoch=1", f"--init_from={result['checkpoint']}", *TINY_DEMO,
              *SMALL_MODEL, "--head_num=2", *common])
    with pytest.raises(ValueError, match=r"--user_encoder: checkpoint MHSA, now GRU"):
        main(["--mode=train", "--dataset=demo", "--epoch=1", f"--init_from={result['checkpoint']}", *TINY_DEMO,
              *SMALL_MODEL, "--user_encoder=GRU", *common])


def _shuffle_dev_labels(data: Path) -> None:
    path = data / "MIND-demo" / "dev" / "behaviors.tsv"
    rng = np.random.default_rng(0)
    lines = []
    for line in path.read_text().splitlines():
        cols = line.split("\t")
        items = cols[4].split()
        labels = rng.permutation([c.rsplit("-", 1)[1] for c in items])
        cols[4] = " ".join(f"{c.rsplit('-', 1)[0]}-{lab}" for c, lab in zip(items, labels))
        lines.append("\t".join(cols))
    path.write_text("\n".join(lines) + "\n")


def _zero_gradient(name: str) -> bool:
    """Attention key biases get a mathematically zero gradient (softmax ignores a shift shared by all keys): Adam turns
    the float noise left there into steps of random sign (see test_ddp.py). Every other weight must match."""
    return name.endswith("mhsa.k.bias")


def test_dev_labels_do_not_change_the_pretraining_checkpoint(pretrained, tmp_path):
    from config import Config
    from main import load_corpus
    from pretraining import build_sequences

    tmp, common, result = pretrained
    shutil.copytree(tmp / "data" / "MIND-demo", tmp_path / "data" / "MIND-demo")
    before = (tmp_path / "data" / "MIND-demo" / "dev" / "behaviors.tsv").read_text()
    _shuffle_dev_labels(tmp_path / "data")
    assert (tmp_path / "data" / "MIND-demo" / "dev" / "behaviors.tsv").read_text() != before
    # the sequences pretraining reads are exactly the same...
    seqs = []
    for data in (tmp / "data", tmp_path / "data"):
        cfg = Config.from_args([*PRETRAIN, f"--data_dir={data}"])
        corpus = load_corpus(cfg, log=lambda *a, **k: None)
        assert corpus.behaviors("dev")["labels"].sum() > 0
        seqs.append(build_sequences(corpus.behaviors("train"), [(s, corpus.behaviors(s)) for s in ("dev", "test")],
                                    cfg.max_history_num))
    assert np.array_equal(seqs[0].news, seqs[1].news) and np.array_equal(seqs[0].user, seqs[1].user)
    # ...and so is the checkpoint, up to float rounding (measured differences up to 1e-5 after the 16 steps: sums in
    # another order; a run on other data moves weights by ~1e-3 per step at --lr=1e-3)
    with one_thread():
        other = main([*PRETRAIN, f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'best_model'}"])
    a = torch.load(result["checkpoint"], weights_only=True)
    b = torch.load(other["checkpoint"], weights_only=True)
    assert list(a["model"]) == list(b["model"]) and a["epoch"] == b["epoch"]
    assert a["pretrain_metrics"]["heldout_loss"] == pytest.approx(b["pretrain_metrics"]["heldout_loss"], rel=1e-6)
    for k in a["model"]:
        if not _zero_gradient(k):
            torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-3, atol=1e-4, msg=k)


def test_two_processes_pretrain_like_one_with_the_global_batch(pretrained, tmp_path):
    from test_ddp import torchrun

    tmp, common, result = pretrained
    # 1 epoch, global batch 50: the 2 processes each hold 25 sequences and gather the negatives of the other
    args = [*PRETRAIN, "--epoch=1", f"--data_dir={tmp / 'data'}"]
    with one_thread():
        one = main([*args, f"--output_dir={tmp_path / 'one'}"])
    proc = torchrun([*args, f"--output_dir={tmp_path / 'two'}"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = tmp_path / "two" / "demo" / "MHSA-MHSA" / "pretrain#1"
    a = torch.load(Path(one["run_dir"]) / checkpoints.LAST_CHECKPOINT, weights_only=True)
    b = torch.load(two / checkpoints.LAST_CHECKPOINT, weights_only=True)
    assert b["world_size"] == 2 and a["step"] == b["step"] > 1
    assert b["history"][0]["train_loss"] == pytest.approx(a["history"][0]["train_loss"], rel=1e-5)
    assert b["history"][0]["heldout_loss"] == pytest.approx(a["history"][0]["heldout_loss"], rel=1e-5)
    compared = 0
    for name in a["model"]:
        if not _zero_gradient(name):
            torch.testing.assert_close(b["model"][name], a["model"][name], rtol=1e-4, atol=1e-5, msg=name)
            compared += 1
    assert compared > 10


def test_a_user_encoder_without_user_vectors_is_refused(pretrained):
    tmp, common, result = pretrained
    with pytest.raises(ValueError, match=r"--user_encoder MINER scores candidates itself .* returns no user vector"):
        main([*PRETRAIN, "--user_encoder=MINER", "--miner_aggregation=max", *common])


def test_pretraining_uses_an_existing_demo_as_training_does(pretrained, tmp_path):
    """Like --mode=train, a new pretraining run takes the demo corpus in --data_dir as it is (untyped --demo_* flags
    adopt its sizes) instead of asking it to have the default sizes."""
    tmp, common, result = pretrained
    flags = [f for f in PRETRAIN if not f.startswith("--demo_")]
    out = main([*flags, "--epoch=1", "--max_steps_per_epoch=1", "--pretrain_tasks=contrastive", f"--data_dir={tmp / 'data'}",
                f"--output_dir={tmp_path / 'out'}"])
    saved = json.loads((Path(out["run_dir"]) / "config.json").read_text())
    assert saved["demo_news"] == 300 and saved["demo_users"] == 120
