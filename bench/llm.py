"""LLM news encoders on the CPU: activation memory with and without --gradient_checkpointing, and the speed-up of
--plm_embeddings=precompute over running the frozen backbone in every step.

    python bench/llm.py                    # both parts (about 3 min on 2 busy CPU cores)
    python bench/llm.py --part memory      # only the gradient-checkpointing memory
    python bench/llm.py --part precompute  # only the precompute speed-up (needs the offline MiniLM package)

memory: a random 4-layer Llama-like backbone (hidden 256, 8 heads, vocabulary 1,000) under PLMMiner-ATT, LoRA rank
8 in every layer (--plm_frozen_layers=0), one training step (forward + backward) on a batch of 256 news x 64
tokens; each setting runs in a fresh process, and the figure is that process' peak resident memory (ru_maxrss)
minus its resident memory just before the step (model built, inputs made): what the step's activations and
gradients add. CPU RAM is what we can measure here; bench/gpu.py's llm-* rows measure the GPU's peak memory.

precompute: PLMMiner-ATT on the offline all-MiniLM-L6-v2 (average pooling, every layer frozen) over the tiny
demo corpus, training steps timed (median of --steps after one warm-up) with the backbone run per batch (the
in-loop frozen path, cache off) vs the stored vectors; the one-off cost of building the store is printed apart.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def memory_child(checkpointing: bool) -> dict:
    """One training step of the LoRA'd random Llama; returns the memory figures (run in its own process)."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    from config import Config
    from MIND_corpus import CorpusMeta
    from newsEncoders import NEWS_ENCODERS

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    LlamaModel(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128)
               ).save_pretrained(folder)
    flags = [f"--plm_model_name={folder}", "--plm_frozen_layers=0", "--plm_lora_rank=8", "--plm_pooling=last",
             "--attention_dim=16", "--category_embedding_dim=8"]
    if checkpointing:
        flags.append("--gradient_checkpointing")
    cfg = Config.from_args(flags)
    meta = CorpusMeta(vocab_size=10, category_num=5, subcategory_num=5, user_num=2, entity_num=1, news_num=300)
    enc = NEWS_ENCODERS["PLMMiner"](cfg, meta).train()
    ids = torch.randint(1, 1000, (256, 64))
    news = {"plm_ids": ids, "plm_mask": torch.ones_like(ids)}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    enc(news).pow(2).sum().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"checkpointing": checkpointing, "before_mib": before / 1024, "peak_mib": peak / 1024,
            "step_mib": (peak - before) / 1024, "seconds": seconds}


def bench_memory() -> list[dict]:
    rows = []
    for checkpointing in (False, True):
        out = subprocess.run([sys.executable, __file__, "--child", "1" if checkpointing else "0"],
                             capture_output=True, text=True, cwd=ROOT, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\n| --gradient_checkpointing | RSS before the step (MiB) | peak (MiB) | added by the step (MiB) | step (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['checkpointing'] else 'off'} | {r['before_mib']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['step_mib']:.0f} | {r['seconds']:.2f} |")
    off, on = rows
    print(f"\nactivation memory with checkpointing: {on['step_mib'] / max(off['step_mib'], 1e-9):.2f} of without")
    return rows


def bench_precompute(steps: int) -> dict:
    import torch

    from config import Config
    from dataset import TrainDataset  # noqa: F401 - the trainer's sample format, through main's corpus
    from main import load_corpus
    from model import Model
    from trainer import build_optimizer

    tmp = Path(tempfile.mkdtemp(prefix="bench-llm-pre-"))
    base = ["--dataset=demo", f"--data_dir={tmp / 'data'}", "--demo_news=300", "--demo_users=120",
            "--demo_train_impressions=300", "--demo_dev_impressions=80", "--demo_test_impressions=80",
            "--news_encoder=PLMMiner", "--user_encoder=ATT", "--plm_model_name=offline-minilm",
            "--plm_pooling=average", "--plm_frozen_layers=6", "--batch_size=32", "--no-progress"]
    results = {}
    for mode in ("in-loop", "precompute"):
        flags = base + (["--plm_embeddings=precompute"] if mode == "precompute" else ["--no-plm_cache"])
        cfg = Config.from_args(flags)
        cfg.validate()
        corpus = load_corpus(cfg, log=lambda *a: None)
        torch.manual_seed(0)
        model = Model(cfg, corpus.meta, corpus.news).train()
        t0 = time.perf_counter()
        model.prepare(log=lambda *a: None)
        build_s = time.perf_counter() - t0
        opt = build_optimizer(model, cfg)
        beh = corpus.behaviors("train")
        from dataset import Batch
        import numpy as np

        rng = np.random.default_rng(0)
        hist = torch.from_numpy(np.asarray(beh["histories"][:32])).long()
        times = []
        for step in range(steps + 1):
            cands = torch.from_numpy(rng.integers(1, model.news_num, (32, 5))).long()
            batch = Batch(user=torch.ones(32).long(), history=hist, history_mask=hist > 0, candidates=cands,
                          candidate_mask=torch.ones(32, 5, dtype=torch.bool), target=torch.zeros(32).long())
            t0 = time.perf_counter()
            opt.zero_grad()
            model(batch).loss.backward()
            opt.step()
            if step:
                times.append(time.perf_counter() - t0)
        results[mode] = {"step_s": statistics.median(times), "build_s": build_s}
    speedup = results["in-loop"]["step_s"] / results["precompute"]["step_s"]
    print("\n| PLMMiner-ATT, offline MiniLM, all 6 layers frozen | training step (median, s) | one-off build (s) |")
    print("|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['step_s']:.3f} | {r['build_s']:.2f} |")
    print(f"\nprecompute speed-up per training step: x{speedup:.1f}")
    return {**results, "speedup": speedup}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("all", "memory", "precompute"), default="all")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per mode (after one warm-up)")
    p.add_argument("--child", choices=("0", "1"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(memory_child(a.child == "1")))
        return 0
    if a.part in ("all", "memory"):
        bench_memory()
    if a.part in ("all", "precompute"):
        bench_precompute(a.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
