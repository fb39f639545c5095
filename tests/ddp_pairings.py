"""Run by test_ddp.py under torchrun (2 processes, gloo): for each pairing on the command line, build the real
`Model` on a tiny synthetic news table, wrap it in DDP exactly as the trainer does (find_unused_parameters off) and
take 2 optimizer steps. DDP stops at the second step when a trainable parameter got no gradient in the first
("Expected to have finished reduction ..."), so a pairing that leaves a parameter unused fails here.

usage: torchrun --nproc_per_node=2 tests/ddp_pairings.py PLM_FOLDER NEWS-USER[:--flag=value,...] ...
Prints `ok NEWS-USER` (rank 0) for each pairing that stepped.
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config  # noqa: E402
from dataset import Batch  # noqa: E402
from MIND_corpus import CorpusMeta  # noqa: E402
from model import Model  # noqa: E402
from popularity import build_popularity  # noqa: E402
from trainer import build_optimizer  # noqa: E402

N, L = 12, 6  # news, tokens per text
META = CorpusMeta(vocab_size=30, category_num=5, subcategory_num=6, user_num=5, entity_num=1, news_num=N)
FLAGS = ["--word_embedding_dim=8", "--head_num=2", "--head_dim=4", "--attention_dim=4", "--cnn_kernel_num=8",
         "--category_embedding_dim=4", "--subcategory_embedding_dim=4", "--hidden_dim=4", "--dropout_rate=0",
         "--max_title_length=6", "--max_abstract_length=6", "--max_history_num=4", "--user_embedding_dim=4",
         "--personalized_embedding_dim=4", "--gcn_layer_num=1", "--OMAP_head_num=2", "--plm_frozen_layers=1",
         "--plm_max_length=6", "--num_interest_vectors=2", "--context_code_dim=4", "--negative_sample_num=2"]


def table() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 20, size=(N, L))
    tokens[0] = 0  # the padding news
    tokens[:, 4:] = 0
    mask = (tokens > 0).astype(np.int8)
    # GLORY's click graph at its default --glory_neighbors (8): own index, then in-neighbours (0 = none).
    neighbours = rng.integers(0, N, size=(N, 8))
    neighbours[0] = 0
    click_graph = np.concatenate([np.arange(N)[:, None], neighbours], 1)
    return {"title": tokens, "abstract": tokens[:, ::-1].copy(), "category": rng.integers(1, 5, N),
            "subcategory": rng.integers(1, 6, N), "plm_ids": tokens, "plm_mask": mask, "click_graph": click_graph}


def popularity():
    """A toy train log for the time-aware user encoders (PP-Rec): 3 impressions at hours 10-12 showing every news,
    news 1-3 clicked once each."""
    shown = np.tile(np.arange(1, N), 3)
    beh = {"time": np.array([10, 11, 12]), "candidates": shown, "labels": (shown % 4 == 1).astype(np.int8),
           "offsets": np.arange(4) * (N - 1), "stats": {}, "path": "toy"}
    return build_popularity(beh, [beh], N, np.ones(3, dtype=bool), 0)


def batch(rank: int) -> Batch:
    g = torch.Generator().manual_seed(rank)
    history = torch.randint(1, N, (2, 4), generator=g)
    history[0, 2:] = 0
    return Batch(user=torch.tensor([1, 2]), history=history, history_mask=history > 0,
                 candidates=torch.randint(1, N, (2, 3), generator=g), candidate_mask=torch.ones(2, 3, dtype=torch.bool),
                 target=torch.tensor([0, 2]), time=torch.tensor([12, 13]))


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    plm, pairings = sys.argv[1], sys.argv[2:]
    news_table = table()
    for pairing in pairings:
        name, _, extra = pairing.partition(":")
        news, user = name.split("-")
        config = Config.from_args([*FLAGS, f"--news_encoder={news}", f"--user_encoder={user}",
                                   f"--plm_model_name={plm}", *[f for f in extra.split(",") if f]])
        torch.manual_seed(0)
        model = Model(config, META, news_table, popularity())
        model.prepare(log=lambda *a: None)
        ddp = DDP(model, broadcast_buffers=False, find_unused_parameters=False)
        optimizer = build_optimizer(model, config)
        ddp.train()
        for _ in range(2):  # the second step is where DDP notices a parameter without gradient
            ddp(batch(rank)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"ok {pairing}", flush=True)
        # Each DDP wrapper goes before the next is built, and every rank waits for the others: a wrapper (its
        # reducer and the gloo work it holds) left for the interpreter's exit, after destroy_process_group, made
        # torch 2.13 abort a rank now and then at exit ("terminate called without an active exception").
        del ddp, optimizer, model
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
