"""Review of pretraining (issue 22): the filler row of an empty DDP shard is no loss and no negative (gloo ranks with
uneven shards compute one process's gradient), sp without another sequence has no self-negative, --init_from names
what it loads and refuses to drop tensors unless --init_from_partial, a task of weight 0 and a task with no usable
sequence are errors."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import pretraining as P

SETTINGS = SimpleNamespace(contrastive_views="crop,mask,reorder", contrastive_crop_ratio=0.5, contrastive_mask_ratio=0.5,
                           contrastive_reorder_ratio=0.5, pretrain_mask_ratio=0.3, sp_max_ratio=0.5)
# 3 sequences of distinct news (1..17): every task has views, and no news repeats across sequences
NEWS = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0], [12, 13, 14, 15, 16, 17]])
TASKS = ("contrastive", "next_click", "mip", "sp")


class ToyModel(nn.Module):
    """News vectors: a table; user vector: tanh(masked mean of the news vectors @ proj). No contextual outputs."""

    contextual = False

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(18, 4, generator=g))
        self.proj = nn.Parameter(torch.randn(4, 4, generator=g))

    def user_vectors(self, vectors, mask, user, ids):
        w = mask.unsqueeze(-1).float()
        return torch.tanh(((vectors * w).sum(1) / w.sum(1).clamp(min=1)) @ self.proj)


def _tasks():
    cfg = SimpleNamespace(contrastive_temperature=0.5)
    return {n: P.PRETRAIN_TASKS[n](cfg, None, 4, {}) for n in TASKS}


def epoch_gradient(batch_size: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """One epoch over the 3 sequences in global batches of `batch_size`, as the trainer steps it: this rank's mean loss
    times the sampler's weight; the gradients summed over the epoch and averaged over ranks (DDP's all-reduce)."""
    model, tasks = ToyModel(), _tasks()
    data = P.PretrainDataset(P.Sequences(NEWS, np.array([1, 2, 3])), np.arange(3),
                             {k for t in tasks.values() for k in t.views}, SETTINGS, seed=0)
    sampler = P.PretrainBatchSampler(len(data), batch_size, 0, rank, world)
    for i, item in enumerate(sampler):
        batch = data[item]
        unique = torch.unique(batch.history)
        ctx = P.Context(model, batch, unique, model.table[unique])
        loss = sum(t(ctx).mean() for t in tasks.values())
        (loss * sampler.weight(i)).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    if world > 1:
        import torch.distributed as dist

        for g in grads.values():
            dist.all_reduce(g)
            g /= world
    return grads


def _rank(rank: int, world: int, batch_size: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        grads = epoch_gradient(batch_size, rank, world)
        if rank == 0:
            torch.save(grads, out)
    finally:
        P._GATHER_GROUP.clear()
        dist.destroy_process_group()


@pytest.mark.parametrize("world,batch_size", [(2, 2), (3, 2), (3, 3)])
def test_ranks_with_an_empty_shard_compute_one_process_gradient(tmp_path, world, batch_size):
    """3 sequences in global batches of 2 (then 1): with 2 ranks the last batch leaves one rank empty; with 3 ranks
    one rank is empty in the first batch, two in the last (and in batches of 3 none). The empty shards' filler rows
    must change nothing: the gradient is one process's."""
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    mp.start_processes(_rank, args=(world, batch_size, str(tmp_path / "store"), str(out)), nprocs=world,
                       start_method="spawn")
    got = torch.load(out, weights_only=True)
    want = epoch_gradient(batch_size)
    for k in want:
        assert want[k].abs().max() > 1e-3, k  # a gradient that says something
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_filler_rows_are_no_loss_and_no_negative_in_any_task():
    """One process, a batch whose last row is marked filler (real False) = the batch without that row."""
    model, tasks = ToyModel(), _tasks()
    data = P.PretrainDataset(P.Sequences(NEWS, np.array([1, 2, 3])), np.arange(3),
                             {k for t in tasks.values() for k in t.views}, SETTINGS, seed=0)
    full, part = data[(np.arange(3), True)], data[(np.arange(2), True)]
    full.real = torch.tensor([True, True, False])
    for name, task in tasks.items():
        got = task(P.Context(model, full, torch.unique(full.history), model.table[torch.unique(full.history)]))
        want = task(P.Context(model, part, torch.unique(part.history), model.table[torch.unique(part.history)]))
        assert got[2] == 0, name
        torch.testing.assert_close(got[:2], want, msg=name)
    # the sampler marks exactly the empty shards' items
    assert [r for _, r in P.PretrainBatchSampler(3, 2, 0, 0, 2)] == [True, False]  # last batch: 1 sample, on rank 1
    assert [r for _, r in P.PretrainBatchSampler(3, 2, 0, 1, 2)] == [True, True]
    assert data[(np.array([0]), False)].real.tolist() == [False]


def test_segment_prediction_of_a_lone_sequence_has_no_self_negative():
    u, p = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.5]])
    batch = P.PretrainBatch(user=torch.tensor([1]), history=torch.tensor([[1, 2]]),
                            history_mask=torch.tensor([[True, True]]), sample=torch.tensor([0]),
                            views={"segment": torch.tensor([[2, 0]])})
    ctx = P.Context(None, batch, torch.arange(3), torch.zeros(3, 2))
    ctx.cache.update({"context": u, "segment": p})
    got = P.SPTask(None, None, 2, {})(ctx)
    want = -math.log(1 / (1 + math.exp(-2.0)))  # the positive term only: -log sigmoid(u.p)
    torch.testing.assert_close(got, torch.tensor([want]))


# -- --init_from: what is loaded, what is dropped, and the mismatch messages --------------------------------------

SAVED = {"news_encoder": "MHSA", "user_encoder": "MHSA", "shared": {"head_num": 4, "word_embedding_dim": 50},
         "news": {"head_num": 4, "attention_dim": 16}, "user": {"head_num": 4, "attention_dim": 16}}


class Encoders(nn.Module):
    """A model with news / user encoder tensors; `adapter`: one more user encoder module (say, LoRA adapters of a
    layer that the fine-tuning run now freezes)."""

    def __init__(self, adapter: bool):
        super().__init__()
        self.news_encoder = nn.Linear(2, 2)
        self.user_encoder = nn.Module()
        self.user_encoder.proj = nn.Linear(2, 2)
        if adapter:
            self.user_encoder.adapter = nn.Linear(2, 2)
        self.click_predictor = nn.Linear(2, 1)

    def model_settings(self):
        return SAVED


def test_init_from_refuses_to_drop_checkpoint_tensors_unless_partial():
    torch.manual_seed(0)
    pre = Encoders(adapter=True)
    ckpt = {"model_settings": SAVED, "model": {**pre.state_dict(), "tasks.mip.x": torch.zeros(1)}}
    with pytest.raises(ValueError, match=r"--init_from ck.pt: 2 encoder tensors .* would be dropped: "
                                         r"user_encoder\.adapter\.bias, user_encoder\.adapter\.weight.*--init_from_partial"):
        P.load_pretrained_encoders(Encoders(adapter=False), ckpt, "ck.pt")
    model = Encoders(adapter=False)
    got = P.load_pretrained_encoders(model, ckpt, "ck.pt", partial=True)
    assert got.dropped == ["user_encoder.adapter.bias", "user_encoder.adapter.weight"]
    assert got.loaded == sorted(k for k in model.state_dict() if not k.startswith("click_predictor"))
    for k in got.loaded:
        assert torch.equal(model.state_dict()[k], pre.state_dict()[k]), k
    text = got.describe()
    assert text.startswith("4 news/user encoder tensors loaded (news_encoder.bias 1, news_encoder.weight 1, "
                           "user_encoder.proj 2)") and "2 checkpoint tensors dropped (--init_from_partial)" in text
    # the pretraining heads (tasks.*) and the click predictor are never encoder tensors: nothing to drop
    assert P.load_pretrained_encoders(Encoders(adapter=True), ckpt, "ck.pt").dropped == []


def test_init_from_partial_without_init_from_is_an_error():
    from config import Config

    with pytest.raises(ValueError, match=r"--init_from_partial says how --init_from loads .* give --init_from"):
        Config.from_args(["--mode=train", "--init_from_partial"])


def test_init_from_settings_differences_name_each_flag_once_and_never_now_none():
    now = {"news_encoder": "MHSA", "user_encoder": "GRU", "shared": {"head_num": 2, "word_embedding_dim": 50},
           "news": {"head_num": 2, "attention_dim": 16}, "user": {"gru_dim": 3}}
    got = P.settings_differences(SAVED, now, with_click=False, other_class_by_name=True)
    # head_num is shared and a news setting: one line; the user encoder is another class: its name alone
    assert got == ["--user_encoder: checkpoint MHSA, now GRU", "--head_num: checkpoint 4, now 2"]
    assert not any("None" in line for line in got)
    lost = {**SAVED, "news": {"head_num": 4}}
    assert P.settings_differences(SAVED, lost, with_click=False, other_class_by_name=True) == [
        "--attention_dim: checkpoint 16, now not a setting"]


# -- a task that trains nothing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--pretrain_tasks=contrastive,mip", "--mip_weight=0"],
                                   ["--pretrain_tasks=sp", "--sp_weight=0"]])
def test_a_task_of_weight_zero_is_an_error_naming_its_flag(flags):
    from config import Config

    flag = flags[1].split("=")[0]
    with pytest.raises(ValueError, match=rf"{flag} must be > 0: a task of weight 0 trains nothing"):
        Config.from_args(["--mode=pretrain", *flags])


def test_tasks_without_a_usable_sample_are_named():
    tasks = {n: P.PRETRAIN_TASKS[n] for n in ("contrastive", "next_click", "mip", "map", "aap", "sp")}
    ones = np.array([[3, 0, 0], [4, 0, 0]])  # two sequences of one click
    bad = P.unusable_tasks(tasks, ones, batch_size=8)
    assert set(bad) == {"next_click", "mip", "map", "sp"} and "at least 2 clicks" in bad["sp"]
    assert set(P.unusable_tasks(tasks, ones, batch_size=1)) == {"contrastive", "next_click", "mip", "map", "sp"}
    lone = np.array([[3, 5, 0], [4, 0, 0]])  # one sequence of two clicks: no in-batch negative for next_click
    assert set(P.unusable_tasks(tasks, lone, batch_size=8)) == {"next_click"}
    assert P.unusable_tasks(tasks, np.array([[3, 5, 0], [4, 6, 0]]), batch_size=8) == {}


def test_pretraining_that_would_train_on_a_zero_loss_stops_before_its_run_folder(tmp_path):
    from common import SMALL_MODEL, TINY_DEMO
    from main import main

    out = tmp_path / "best_model"
    with pytest.raises(ValueError, match=r"--pretrain_tasks contrastive,mip: a task would train on a loss of 0 .*"
                                         r"contrastive scores a sequence against the other sequences of its batch: "
                                         r"--batch_size 1 leaves none.*leave out contrastive"):
        main(["--mode=pretrain", "--dataset=demo", "--epoch=1", "--batch_size=1", "--pretrain_tasks=contrastive,mip",
              f"--data_dir={tmp_path / 'data'}", f"--output_dir={out}", *TINY_DEMO, *SMALL_MODEL])
    assert not list(out.rglob("pretrain#*"))
