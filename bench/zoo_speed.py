"""Training-step time of the paper models against NRMS's, in the same run (issue 25: any encoder more than 5x slower
than NRMS per sample says why in docs/models.md).

    python bench/zoo_speed.py                                   # NRMS + the models since NNR, demo corpus, 1 thread
    python bench/zoo_speed.py --models NRMS,CAUM --rounds 5 --steps 8

Every model steps the same batches (the demo's first `--steps` training batches of each round's epoch, on the
device, batch 64, K = 4 negatives), with the trainer's inner loop (forward, backward, clipping, Adam, schedule;
bench/train.py's Stepper), interleaved model by model in each round (load from other jobs hits all alike); medians
over rounds. Ratio = median over rounds of (model's seconds per step / NRMS's in that round); batches are the same
size, so it is also the ratio per sample. Prints a markdown table; bench/README.md records the figures.
"""
from __future__ import annotations

import argparse
import sys
import time
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import (THREADS_HELP, Stepper, bench_config, interleaved, machine, median, print_table,  # noqa: E402
                         ratio, set_threads, synchronizer)
from zoo import PAPER_MODELS  # noqa: E402
from dataset import TrainDataset  # noqa: E402
from devices import setup_runtime  # noqa: E402
from main import load_corpus  # noqa: E402
from model import Model  # noqa: E402
from popularity import time_popularity_for  # noqa: E402
from trainer import GlobalBatchSampler  # noqa: E402

NEW_MODELS = ["Fastformer", "TANR", "CAUM", "MINS", "PP-Rec", "GLORY"]


def build(name: str, args):
    """(config, runtime, model, stepper, training data, sampler) of a PAPER_MODELS entry on the bench corpus."""
    cfg = bench_config(args.data_dir, "demo", args.device, *PAPER_MODELS[name], f"--batch_size={args.batch_size}",
                       *args.extra.split())
    rt = setup_runtime(cfg)
    corpus = load_corpus(cfg)
    torch.manual_seed(0)
    model = Model(cfg, corpus.meta, corpus.news, time_popularity_for(cfg, corpus)).to(rt.device)
    model.prepare(log=lambda *a: None)
    model.train()
    data = TrainDataset(corpus.behaviors("train"), cfg.negative_sample_num, seed=cfg.seed)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return rt, model, Stepper(model, cfg, rt), data, GlobalBatchSampler(len(data), cfg.batch_size, cfg.seed), params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(["NRMS", *NEW_MODELS]),
                   help="comma-separated bench/zoo.py names; NRMS is always timed first (the baseline)")
    p.add_argument("--data_dir", default="data/bench/perf-demo", help="the generated demo corpus (git-ignored)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--extra", default="", help="more main.py flags for every model")
    args = p.parse_args(argv)
    names = list(dict.fromkeys(["NRMS", *[n.strip() for n in args.models.split(",") if n.strip()]]))
    unknown = [n for n in names if n not in PAPER_MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {list(PAPER_MODELS)}")
    set_threads(args.threads)
    built = {name: build(name, args) for name in names}
    rt = built["NRMS"][0]
    sync = synchronizer(rt.device)
    print(f"device: {machine(rt.device)}; demo corpus ({args.data_dir}); batch {args.batch_size}; "
          f"{args.rounds} rounds x {args.steps} steps per model")

    def measure(name: str):
        _, model, stepper, data, sampler, _ = built[name]

        def run(r: int) -> float:
            data.set_epoch(r + 1)
            sampler.set_epoch(r + 1)
            batches = [data[idx].to(rt.device) for idx in islice(sampler, args.steps)]  # the same for every model
            sync()
            t0 = time.perf_counter()
            for batch in batches:
                stepper.step(model, batch)
            sync()
            return (time.perf_counter() - t0) / len(batches)

        return run

    stepper_of = {name: measure(name) for name in names}
    for fn in stepper_of.values():  # one untimed step each: first-call allocations
        fn(-1)
    res = interleaved(stepper_of, args.rounds)
    rows = [[name, f"`{' '.join(PAPER_MODELS[name])}`", f"{median(res[name]) * 1e3:,.0f}",
             f"{median(res[name]) * 1e3 / args.batch_size:.2f}", f"{ratio(res, name, 'NRMS'):.2f}",
             f"{built[name][5]:,}"] for name in names]
    print()
    print_table(["model", "flags", "ms / step", "ms / sample", "x NRMS (per sample)", "trainable parameters"], rows)


if __name__ == "__main__":
    main()
