"""Check a GPU machine in one command: correctness rows (pass / FAIL) and speed rows (measured, beside the
hardware's limit and the project's goals), printed as one table row by row and written as markdown and JSON.

    python bench/gpu.py                      # on the GPU machine (no network, no offline packages needed)
    python bench/gpu.py --smoke              # the same code on the CPU at toy sizes (tests/test_gpu_bench.py)
    python bench/gpu.py --rows=pytest,amp    # only some rows (prefixes of the row keys listed by --help)

Nothing is downloaded: the PLM is a random-weight BERT-base-sized model (BertConfig defaults: 12 layers, 768-d,
vocabulary padded to 30,522) saved with save_pretrained beside a WordPiece vocabulary written from the generated
corpus' words, and word embeddings start random (no GloVe), so speed is measured on the real shapes; corpora are
generated with the demo generator (demo_corpus.generate_demo) in --data_dir.

Rows (keys for --rows):
- setup-*     generate the corpora, write the random BERT folder (their seconds count against the budget);
- speed-plm-full, speed-plm-frozen: PLMNRMS-MHSA training on a MIND-small-sized corpus (65k news generated), all
  layers fine-tuned vs --plm_frozen_layers=10 with the frozen-layer cache: train impressions/s, seconds per
  MIND-small epoch projected from the measured samples/s (236k training samples per epoch), the PLM's achieved
  TFLOP/s and its share of the bf16 dense peak, peak GPU memory. Timed over --steps steps after warm-up steps,
  through the trainer's own DataLoader and inner loop (`bench/train.py`'s Stepper), batch building included;
- speed-dev-plm, speed-dev-nrms: `evaluation.evaluate` on the MIND-small-sized dev split (73,152 impressions);
- speed-nrms: NRMS (MHSA-MHSA, 300-d random word embeddings) training, as above;
- speed-compile: NRMS training through torch.compile(dynamic=True) (what --compile does) vs the eager speed-nrms
  row, compilation (the first steps) timed apart; started only with a minute of --budget left;
- pytest: the model-level test modules on the device ($MIND_TEST_DEVICE): every registered encoder pairing trains a
  step and its cached evaluation equals the full forward (tests/test_model_zoo.py, test_encoders.py,
  test_perf_correctness.py); tests that need the offline GloVe / MiniLM packages skip where those are absent;
- amp-*: --amp=bf16 and --amp=fp16 (GradScaler) for NRMS, PLMNRMS-MHSA and PLMMiner-MINER: 50 optimizer steps
  (smoke: 10) on 4 fixed batches, every loss finite and the last steps' mean loss below the first steps'; then the
  logits of the mixed-precision forward vs fp32 on the trained weights (eval mode, a dev batch), within AMP_RTOL
  of the largest fp32 logit. fp16 needs CUDA ('skipped: no CUDA' on CPU); bf16 autocast also runs on the CPU, so
  the smoke mode exercises it;
- llm-lora-fp32, llm-lora-bf16, llm-lora-bf16-ckpt: a random decoder-only LLM of Qwen2.5-0.5B's shape (24 layers,
  896-d, 14 heads / 2 KV heads, MLP 4,864, vocabulary 151,936; smoke: 2 layers, 64-d) under PLMMiner with LoRA rank
  16 on q/k/v/o of every layer (--plm_frozen_layers=0, last-token pooling): one training step (forward + backward +
  Adam on the adapters) on 1,024 news x 32 tokens (smoke: 16 x 8), backbone fp32 / --plm_dtype=bf16 / bf16 +
  --gradient_checkpointing: peak GPU memory (torch.cuda.max_memory_allocated over the step, weights included) and
  step time; pass when the loss is finite and only LoRA adapters of the backbone got gradients;
- cache-host: the frozen-layer cache on the device vs forced into pinned host memory: same logits and loss;
- torchrun, nccl: `torchrun --nproc_per_node=1 main.py` train -> dev -> test (prediction.zip) -> --resume on a
  small generated corpus; with one process main.py starts no process group (it does for 2+), so the nccl row
  checks the backend itself under torchrun (all_reduce, all_gather_object, barrier). --smoke launches main.py's
  stages with plain python (a torch import less per stage); its nccl row still runs torchrun (gloo on the CPU);

PLM FLOPs (speed-plm-*): a forward pre-hook on the PLM records the shape [N, l] of every call during the timed
steps (l = the chunk's width after dynamic padding, so padding slots the GPU computes count, real and padded
alike). Each transformer layer that runs costs, per call, 2 * P_layer * N * l (every weight multiplies every token
once: a multiply and an add) + 4 * N * l^2 * d (attention scores Q K^T and their use on V), P_layer the layer's
parameters (7.1M for BERT-base), d the hidden size; layers that train cost 3x that (backward: gradients of the
inputs and of the weights, each as much as the forward), frozen layers 1x (with the cache they do not run at all).
Embeddings are lookups (not counted). Achieved TFLOP/s = these FLOPs / the timed steps' wall time (the whole step:
user encoder, optimizer and batch building included), so it is the PLM's share of the hardware actually used.
Every training row also runs one more step under torch's FlopCounterMode (matmuls, convolutions and attention of the
whole model, forward and backward): the 'whole model' TFLOP/s, a cross-check of the formula and NRMS's figure.

Where a goal is missed, a torch.profiler summary of a few steps (top ops by GPU time) goes to <out>/profile.txt.
Every row runs in try/except (subprocess rows with timeouts, their process groups killed on timeout); speed rows not
started before --budget seconds are 'skipped: budget', no row starts after --deadline seconds and subprocess timeouts
are cut to end before it; gpu.md and gpu.json are rewritten after each row, so a killed run keeps its finished rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def nccl_probe() -> None:
    """Run by torchrun (--nccl_probe): the backend main.py uses for 2+ processes, on this device."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, device_id=device if cuda else None)
    x = torch.full((4,), float(dist.get_rank() + 1), device=device)
    dist.all_reduce(x)
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, {"rank": dist.get_rank()})
    dist.barrier()
    expected = dist.get_world_size() * (dist.get_world_size() + 1) / 2
    ok = bool((x == expected).all()) and objects[0] == {"rank": 0}
    print(f"probe backend={dist.get_backend()} world={dist.get_world_size()} all_reduce={x.tolist()} ok={ok}")
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__" and sys.argv[1:] == ["--nccl_probe"]:  # the nccl row's torchrun child: torch alone
    nccl_probe()

from train import Stepper, bench_config, demo_flags, synchronizer  # noqa: E402

from config import Config  # noqa: E402
from dataset import EvalDataset, TrainDataset  # noqa: E402
from devices import setup_runtime  # noqa: E402
from evaluation import evaluate  # noqa: E402
from main import load_corpus  # noqa: E402
from MIND_corpus import Corpus  # noqa: E402
from model import Model  # noqa: E402
from trainer import GlobalBatchSampler  # noqa: E402

# MIND-small: about 236k training samples (one per click) per epoch, 73,152 dev impressions.
EPOCH_SAMPLES = 236_000
GOAL_FULL_EPOCH_S = 300.0  # BERT-base PLM-NRMS, all layers fine-tuned: one MIND-small epoch <= 5 minutes
GOAL_FROZEN_EPOCH_S = 60.0  # 10 of 12 layers frozen and cached: <= 1 minute
GOAL_DEV_S = 30.0  # MIND-small dev evaluation
GOAL_PEAK_FRACTION = 0.30  # PLM training at >= 30% of the bf16 dense peak
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the first name fragment
# found in torch.cuda.get_device_name wins (so the PCIe / NVL variants, with lower clocks, come before "H100").
BF16_PEAKS = [("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
              ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0)]
# Mixed-precision logits vs fp32, relative to the largest |fp32 logit|. bf16 keeps 8 significant bits (a rounding
# error up to 2^-9 = 2e-3 per operation), fp16 11 bits (2^-12 = 2.4e-4); autocast keeps softmax, layer norm and the
# loss in fp32, so errors add up over the matmuls of ~12 layers: a few percent for bf16, well under one for fp16. A
# broken path (a mask lost in half precision, an overflow) differs by O(1).
AMP_RTOL = {"bf16": 5e-2, "fp16": 1e-2}


# ----------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Sizes:
    speed: dict[str, int]  # the MIND-small-sized corpus of the speed rows
    check: dict[str, int]  # the small corpus of the correctness rows
    bert: dict[str, int]  # BertConfig arguments (empty: BERT-base)
    model: list[str]  # main.py flags of every model (smoke: small heads; full: the defaults)
    word_dim: int  # NRMS word embedding size (random init: no GloVe on the GPU machine)
    frozen: int  # --plm_frozen_layers of the frozen-layer rows (all layers but the top 2)
    batch_size: int
    warmup: int  # untimed steps before a speed measurement
    steps: int  # timed steps
    compile_warmup: int  # compiled steps (compilation) before the timed ones
    compile_backend: str  # torch.compile backend: inductor (what --compile uses); smoke: eager (no C++ build)
    amp_steps: int
    amp_batch: int
    profile_steps: int
    pytest_targets: list[str]
    pytest_timeout: int
    torchrun_steps: int
    torchrun_timeout: int
    torchrun: bool  # launch main.py's stages with torchrun (smoke: plain python, one torch import less per stage)
    compile_needs_s: float  # seconds the compile row needs before --budget runs out, or it is skipped


FULL = Sizes(
    # 65k news as MIND-small; fewer train impressions than its 156,965 (only --steps batches are drawn; the epoch is
    # projected from samples/s), the full 73,152 dev impressions (the dev row evaluates them all).
    speed=dict(news=65000, users=50000, train_impressions=30000, dev_impressions=73152),
    check=dict(news=3000, users=2000, train_impressions=3000, dev_impressions=500),
    bert={}, model=[], word_dim=300, frozen=10, batch_size=64, warmup=3, steps=20, compile_warmup=6,
    compile_backend="inductor", amp_steps=50, amp_batch=32,
    profile_steps=3,
    pytest_targets=["tests/test_model_zoo.py", "tests/test_encoders.py", "tests/test_perf_correctness.py"],
    pytest_timeout=240, torchrun_steps=20, torchrun_timeout=120, torchrun=True, compile_needs_s=60,
)
SMOKE = Sizes(
    speed=dict(news=300, users=120, train_impressions=300, dev_impressions=80),
    check=dict(news=300, users=120, train_impressions=300, dev_impressions=80),
    bert=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64),
    model=["--head_num=4", "--head_dim=8", "--attention_dim=16", "--num_interest_vectors=4", "--context_code_dim=16"],
    word_dim=32, frozen=1, batch_size=8, warmup=1, steps=2, compile_warmup=1, compile_backend="eager", amp_steps=10,
    amp_batch=8, profile_steps=1,
    pytest_targets=["tests/test_encoders.py::test_news_encoder_batch_independence[PLMNRMS]"],
    pytest_timeout=120, torchrun_steps=2, torchrun_timeout=120, torchrun=False, compile_needs_s=0,
)


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    key: str
    name: str
    status: str = ""  # pass | FAIL | measured | met | missed: ... | skipped: ...
    value: str = ""
    limit: str = ""  # the hardware's limit
    goal: str = ""
    detail: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)  # numbers, for the JSON


class Table:
    """Rows as they finish: printed (flushed) and the markdown + JSON rewritten after each one."""

    COLUMNS = ("row", "status", "value", "hardware limit", "goal", "detail", "s")

    def __init__(self, out: Path, header: dict[str, Any]):
        self.out, self.header, self.rows = out, header, []
        out.mkdir(parents=True, exist_ok=True)
        print("| " + " | ".join(self.COLUMNS) + " |\n|" + "---|" * len(self.COLUMNS), flush=True)

    @staticmethod
    def cells(r: Row) -> list[str]:
        cells = [r.name, r.status, r.value, r.limit, r.goal, r.detail]
        return [c.replace("|", "\\|").replace("\n", " ") for c in cells] + [f"{r.seconds:.1f}"]

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print("| " + " | ".join(self.cells(row)) + " |", flush=True)
        self.write()

    def markdown(self) -> str:
        h = self.header
        lines = [f"# GPU check: {h['device']}", "",
                 f"{h['started']}; torch {h['torch']}, CUDA {h['cuda']}; bf16 dense peak "
                 + (f"{h['peak_tflops']:.0f} TFLOP/s" if h['peak_tflops'] else "unknown")
                 + f"; {'smoke (toy sizes)' if h['smoke'] else 'full sizes'}; "
                 f"command `{h['command']}`", "",
                 "| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
        lines += ["| " + " | ".join(self.cells(r)) + " |" for r in self.rows]
        if "total_seconds" in h:
            lines += ["", f"total wall time {h['total_seconds']:.1f} s"]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        for name, text in (("gpu.md", self.markdown()),
                           ("gpu.json", json.dumps({"header": self.header, "rows": [vars(r) for r in self.rows]},
                                                   indent=1, default=str))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)


def first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# ----------------------------------------------------------------------------------------------------------
# Context: device, corpora, the random PLM folder
# ----------------------------------------------------------------------------------------------------------

def quiet(*args, **kwargs) -> None:
    pass


def bf16_peak(name: str) -> float | None:
    return next((peak for fragment, peak in BF16_PEAKS if fragment in name), None)


class Context:
    def __init__(self, args, sizes: Sizes):
        self.args, self.sizes = args, sizes
        self.device = torch.device(args.device if args.device != "auto" else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.device_name = torch.cuda.get_device_name(self.device) if self.cuda else "CPU"
        self.peak = bf16_peak(self.device_name) if self.cuda else None
        self.data = Path(args.data_dir)
        self.out = Path(args.out)
        self.sync = synchronizer(self.device)
        self._corpora: dict[tuple, Corpus] = {}
        self.keep: dict[str, Any] = {}  # results later rows read (eager NRMS speed, the frozen PLM model)
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def timeout(self, seconds: float) -> float:
        """A subprocess' timeout: its own, cut so that it ends 10 s before --deadline (at least 10 s)."""
        return max(10.0, min(seconds, self.args.deadline - self.elapsed() - 10))

    def config(self, which: str, *flags: str) -> Config:
        sizes = self.sizes.speed if which == "speed" else self.sizes.check
        return bench_config(str(self.data / which), sizes, str(self.device), *self.sizes.model, *flags)

    def corpus(self, cfg: Config) -> Corpus:
        # What load_corpus reads differs by these (PLM tokens, the GloVe matrix's size).
        key = (cfg.data_dir, cfg.news_encoder.startswith("PLM"), cfg.plm_model_name, cfg.word_embedding_dim)
        if key not in self._corpora:
            self._corpora[key] = load_corpus(cfg, log=quiet)
        return self._corpora[key]

    @property
    def plm_folder(self) -> Path:
        return self.data / ("bert-smoke-random" if self.args.smoke else "bert-base-random")

    @property
    def nrms_flags(self) -> list[str]:
        return ["--news_encoder=MHSA", "--user_encoder=MHSA", f"--word_embedding_dim={self.sizes.word_dim}"]

    def plm_flags(self, frozen: int) -> list[str]:
        return [f"--plm_model_name={self.plm_folder}", f"--plm_frozen_layers={frozen}"]

    def free(self) -> None:
        """Give the GPU memory of the finished row back (its models are out of scope)."""
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def write_random_bert(folder: Path, words: list[str], bert: dict[str, int]) -> None:
    """A random-weight BERT (BertConfig defaults = BERT-base, unless `bert` says otherwise) and a WordPiece
    tokenizer whose vocabulary is the corpus' words (one token per word, like a real tokenizer on common words),
    saved with save_pretrained: what --plm_model_name reads, with no network. BERT-base's vocabulary size is kept
    (unused rows) so the embedding matrix and its optimizer state have the real size."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + sorted({w.lower() for w in words if w.strip() and not w.startswith("<")} - set(special))
    size = len(vocab) if bert else max(len(vocab), BertConfig().vocab_size)
    vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    tmp = Path(tempfile.mkdtemp(prefix=".bert-", dir=folder.parent))
    try:
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizerFast(vocab_file=str(tmp / "vocab.txt")).save_pretrained(tmp)
        torch.manual_seed(0)
        BertModel(BertConfig(**{**bert, "vocab_size": size})).save_pretrained(tmp)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ----------------------------------------------------------------------------------------------------------
# Measuring training steps
# ----------------------------------------------------------------------------------------------------------

class PLMFlops:
    """FLOPs of the PLM's transformer layers over the token slots of each call (see the module docstring)."""

    def __init__(self, enc):
        """enc: a PLM news encoder (its `plm`, the layer stack `_all_layers` and where the stack lives)."""
        self.enc = enc
        self.layer_params = sum(p.numel() for p in enc._all_layers[0].parameters())
        self.hidden = enc.plm.config.hidden_size
        self.flops = 0.0
        self.slots = 0
        self.calls = 0
        self.active = False
        self.handle = enc.plm.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        if not self.active:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        n, length = ids.shape
        forward = 2 * self.layer_params * n * length + 4 * n * length * length * self.hidden
        stack = getattr(self.enc._layers_parent, self.enc._layers_attr)  # the layers this call runs
        grad = torch.is_grad_enabled()
        for layer in stack:
            trained = grad and any(p.requires_grad for p in layer.parameters())
            self.flops += forward * (3 if trained else 1)
        self.slots += n * length
        self.calls += 1

    def close(self) -> None:
        self.handle.remove()


def batches_forever(data: TrainDataset, sampler: GlobalBatchSampler, cfg: Config, device: torch.device) -> Iterator:
    """The trainer's DataLoader (same sampler, batch_size=None, pinned memory on CUDA), epoch after epoch."""
    epoch = 1
    while True:
        data.set_epoch(epoch)
        sampler.set_epoch(epoch)
        yield from torch.utils.data.DataLoader(data, sampler=sampler, batch_size=None, num_workers=cfg.num_workers,
                                               pin_memory=device.type == "cuda")
        epoch += 1


def profile_to_file(ctx: Context, title: str, fn: Callable[[], Any], steps: int) -> str:
    """Run `fn` `steps` times under torch.profiler; append the top ops (by GPU time, CPU time on CPU) to profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    key = "self_device_time_total" if ctx.cuda else "self_cpu_time_total"
    try:  # the measurement is done: a profiler that cannot start (no CUPTI, ...) must not fail the row
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            ctx.sync()
        text = prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)
    except Exception as e:  # noqa: BLE001
        return f"no profile ({first_line(e)})"
    with open(ctx.out / "profile.txt", "a") as f:
        f.write(f"## {title} ({steps} steps, sorted by {key})\n\n{text}\n\n")
    return f"profile of {steps} steps in profile.txt"


def counted_step_flops(step: Callable[[], Any]) -> float | None:
    """FLOPs of one more training step as torch's FlopCounterMode counts them (matmuls, convolutions and attention
    of the whole model, forward and backward): a cross-check of the PLM formula, and the figure for models
    without one. None if the counter fails (it must not fail the row)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001
        return None


def train_speed(ctx: Context, flags: list[str], compiled: bool = False) -> dict[str, Any]:
    """Train steps of a model on the speed corpus through the trainer's loader and inner loop. Returns the numbers
    and, for later use (profiling, the dev row), the model, its Stepper and the batch iterator."""
    s = ctx.sizes
    cfg = ctx.config("speed", *flags, f"--batch_size={s.batch_size}")
    rt = setup_runtime(cfg, log=quiet)
    corpus = ctx.corpus(cfg)
    torch.manual_seed(0)
    model = Model(cfg, corpus.meta, corpus.news).to(rt.device)
    ctx.sync()
    t0 = time.perf_counter()
    model.prepare(log=quiet)
    ctx.sync()
    cache_s = time.perf_counter() - t0 if getattr(model.news_encoder, "has_frozen_cache", False) else None
    model.train()
    stepper = Stepper(model, cfg, rt)
    data = TrainDataset(corpus.behaviors("train"), cfg.negative_sample_num, seed=cfg.seed)
    impressions_per_sample = len(np.unique(data.sample_impression)) / max(1, len(data))  # as the trainer logs it
    sampler = GlobalBatchSampler(len(data), cfg.batch_size, cfg.seed)
    it = batches_forever(data, sampler, cfg, rt.device)
    module = torch.compile(model, dynamic=True, backend=s.compile_backend) if compiled else model
    warm = s.compile_warmup if compiled else s.warmup
    t0 = time.perf_counter()
    losses = [stepper.step(module, next(it).to(rt.device, non_blocking=True)) for _ in range(warm)]
    ctx.sync()
    warm_s = time.perf_counter() - t0
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    counter = PLMFlops(model.news_encoder) if getattr(model.news_encoder, "uses_plm", False) and not compiled else None
    if counter is not None:
        counter.active = True
    samples, load_s = 0, 0.0
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(s.steps):
        t1 = time.perf_counter()
        batch = next(it)
        load_s += time.perf_counter() - t1
        samples += int(batch.target.shape[0])
        losses.append(stepper.step(module, batch.to(rt.device, non_blocking=True)))
    ctx.sync()
    dt = time.perf_counter() - t0
    if counter is not None:
        counter.active = False
        counter.close()
    peak_gib = torch.cuda.max_memory_allocated(rt.device) / 2**30 if ctx.cuda else None
    samples_s = samples / dt
    step_flops = None if compiled else counted_step_flops(lambda: stepper.step(
        module, next(it).to(rt.device, non_blocking=True)))
    r = {"cfg": cfg, "rt": rt, "model": model, "module": module, "stepper": stepper, "it": it, "corpus": corpus,
         "step_ms": dt / s.steps * 1e3, "batch_build_ms": load_s / s.steps * 1e3, "samples_s": samples_s,
         "impressions_s": samples_s * impressions_per_sample, "epoch_s": EPOCH_SAMPLES / samples_s,
         "cache_s": cache_s, "warmup_s": warm_s, "peak_gib": peak_gib, "losses": losses,
         "finite": all(math.isfinite(x) for x in losses), "news": model.news_num - 1, "amp": rt.amp,
         "model_tflops": step_flops / (dt / s.steps) / 1e12 if step_flops else None}
    if counter is not None:
        r.update(tflops=counter.flops / dt / 1e12, slots_per_step=counter.slots / s.steps,
                 plm_calls_per_step=counter.calls / s.steps, layer_params=counter.layer_params)
    return r


def speed_detail(r: dict[str, Any], ctx: Context) -> str:
    parts = [f"{r['step_ms']:.0f} ms/step (batch building {r['batch_build_ms']:.1f} ms), {ctx.sizes.steps} steps "
             f"after {len(r['losses']) - ctx.sizes.steps} warm-up ({r['warmup_s']:.1f} s), "
             f"batch {r['cfg'].batch_size}, "
             f"amp {r['amp']}, {r['news']:,} news"]
    if r.get("slots_per_step") is not None:
        parts.append(f"{r['slots_per_step']:,.0f} PLM token slots/step in {r['plm_calls_per_step']:.0f} calls")
    if r.get("model_tflops") is not None:
        parts.append(f"whole model {r['model_tflops']:.3g} TFLOP/s (FLOPs of one step counted by torch's "
                     f"FlopCounterMode / the mean step time)")
    if r["cache_s"] is not None:
        parts.append(f"frozen-layer cache build {r['cache_s']:.1f} s (once per corpus, not in the epoch)")
    if r["peak_gib"] is not None:
        parts.append(f"peak GPU memory {r['peak_gib']:.1f} GiB")
    parts.append(f"losses {'finite' if r['finite'] else 'NOT FINITE'}")
    return "; ".join(parts)


def plm_limit(r: dict[str, Any], ctx: Context) -> tuple[str, float | None]:
    if ctx.peak is None:
        return f"{r['tflops']:.3g} TFLOP/s achieved; bf16 peak unknown for {ctx.device_name}", None
    fraction = r["tflops"] / ctx.peak
    return f"{r['tflops']:.3g} of {ctx.peak:.0f} TFLOP/s bf16 dense = {fraction:.1%}", fraction


def row_speed_plm(ctx: Context, row: Row, frozen: bool) -> None:
    s = ctx.sizes
    layers = s.bert.get("num_hidden_layers", 12)
    n_frozen = s.frozen if frozen else 0
    r = train_speed(ctx, ["--news_encoder=PLMNRMS", "--user_encoder=MHSA", *ctx.plm_flags(n_frozen)])
    goal_s = GOAL_FROZEN_EPOCH_S if frozen else GOAL_FULL_EPOCH_S
    row.value = f"{r['impressions_s']:,.0f} train imp/s; epoch {r['epoch_s']:,.0f} s"
    row.limit, fraction = plm_limit(r, ctx)
    row.goal = f"epoch <= {goal_s:.0f} s; >= {GOAL_PEAK_FRACTION:.0%} of peak"
    missed = ([f"epoch {r['epoch_s']:,.0f} s > {goal_s:.0f} s"] if r["epoch_s"] > goal_s else []) + \
        ([f"{fraction:.1%} of peak"] if fraction is not None and fraction < GOAL_PEAK_FRACTION else []) + \
        (["peak unknown"] if fraction is None else [])
    row.status = "met" if not missed else "missed: " + ", ".join(missed)
    if not r["finite"]:
        row.status = "FAIL"
    row.detail = f"{n_frozen} of {layers} layers frozen" + (" + cache" if frozen else "") + "; " + speed_detail(r, ctx)
    row.data = {k: v for k, v in r.items() if isinstance(v, (int, float, str, type(None)))}
    row.data["goal_epoch_s"], row.data["peak_fraction"] = goal_s, fraction
    if missed:
        row.detail += "; " + profile_to_file(ctx, row.name, lambda: r["stepper"].step(
            r["module"], next(r["it"]).to(r["rt"].device, non_blocking=True)), s.profile_steps)
    if frozen:
        ctx.keep["plm_frozen"] = {k: r[k] for k in ("cfg", "rt", "model", "corpus")}


def row_speed_nrms(ctx: Context, row: Row, compiled: bool = False) -> None:
    r = train_speed(ctx, ctx.nrms_flags, compiled)
    row.value = f"{r['impressions_s']:,.0f} train imp/s; epoch {r['epoch_s']:,.0f} s"
    tf = r.get("model_tflops")
    row.limit = "-" if tf is None else (f"{tf:.3g} of {ctx.peak:.0f} TFLOP/s bf16 dense = {tf / ctx.peak:.1%}"
                                        if ctx.peak else f"{tf:.3g} TFLOP/s; bf16 peak unknown")
    row.status = "measured" if r["finite"] else "FAIL"
    row.detail = speed_detail(r, ctx)
    row.data = {k: v for k, v in r.items() if isinstance(v, (int, float, str, type(None)))}
    if compiled:
        eager = ctx.keep.get("nrms_step_ms")
        row.detail = (f"backend {ctx.sizes.compile_backend}, compilation (first {ctx.sizes.compile_warmup} steps) "
                      f"{r['warmup_s']:.1f} s; "
                      + (f"x{eager / r['step_ms']:.2f} the eager speed-nrms step ({eager:.0f} ms); " if eager else "")
                      + row.detail)
    else:
        ctx.keep["nrms_step_ms"] = r["step_ms"]
        ctx.keep["nrms"] = {k: r[k] for k in ("cfg", "rt", "model", "corpus")}


def row_speed_dev(ctx: Context, row: Row, which: str) -> None:
    """evaluation.evaluate on the whole MIND-small-sized dev split, with the model of an earlier speed row (or a new
    one); the frozen-layer cache is built before the clock starts (training has it already)."""
    kept = ctx.keep.get(which)
    if kept is None:
        flags = (["--news_encoder=PLMNRMS", "--user_encoder=MHSA", *ctx.plm_flags(ctx.sizes.frozen)]
                 if which == "plm_frozen" else ctx.nrms_flags)
        cfg = ctx.config("speed", *flags)
        rt = setup_runtime(cfg, log=quiet)
        corpus = ctx.corpus(cfg)
        torch.manual_seed(0)
        kept = {"cfg": cfg, "rt": rt, "corpus": corpus, "model": Model(cfg, corpus.meta, corpus.news).to(rt.device)}
    cfg, rt, model, corpus = kept["cfg"], kept["rt"], kept["model"], kept["corpus"]
    model.prepare(log=quiet)
    dev = corpus.behaviors("dev")
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    ctx.sync()
    t0 = time.perf_counter()
    result = evaluate(model, dev, cfg, rt)
    ctx.sync()
    dt = time.perf_counter() - t0
    n = dev["stats"]["impressions"]
    row.value = f"{dt:.1f} s = {n / dt:,.0f} dev imp/s"
    row.limit = "-"
    row.goal = f"MIND-small dev <= {GOAL_DEV_S:.0f} s"
    projected = dt * 73152 / n
    row.status = "met" if projected <= GOAL_DEV_S else f"missed: {projected:.0f} s"
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated(rt.device) / 2**30:.1f} GiB" if ctx.cuda else ""
    row.detail = (f"{cfg.model_name}, {n:,} impressions, {len(np.asarray(dev['candidates'])):,} candidates, "
                  f"eval batch {cfg.eval_batch_size}, amp {rt.amp}{peak}; "
                  f"AUC {result.metrics.get('auc', float('nan')):.3f} "
                  f"(random or barely trained weights: a speed figure, not a result)"
                  + ("" if n == 73152 else f"; {projected:.1f} s projected for 73,152"))
    row.data = {"seconds": dt, "impressions": n, "projected_s": projected}
    if projected > GOAL_DEV_S:
        from eval import subset

        part = subset(dev, np.arange(min(n, 1000)))
        row.detail += "; " + profile_to_file(ctx, f"{row.name} (first 1000 impressions)",
                                             lambda: evaluate(model, part, cfg, rt), 1)
    ctx.keep.pop(which, None)


# ----------------------------------------------------------------------------------------------------------
# Correctness rows
# ----------------------------------------------------------------------------------------------------------

AMP_MODELS = {
    "NRMS": ["--news_encoder=MHSA", "--user_encoder=MHSA"],  # + --word_embedding_dim
    "PLMNRMS-MHSA": ["--news_encoder=PLMNRMS", "--user_encoder=MHSA"],
    "PLMMiner-MINER": ["--news_encoder=PLMMiner", "--user_encoder=MINER"],
}


def row_amp(ctx: Context, row: Row, name: str, amp: str) -> None:
    """Training steps on fixed batches under autocast, then the mixed-precision forward vs fp32 (same weights)."""
    if amp == "fp16" and not ctx.cuda:
        row.status, row.detail = "skipped: no CUDA", "fp16 training needs the CUDA GradScaler"
        return
    s = ctx.sizes
    word = [f"--word_embedding_dim={s.word_dim}"]
    flags = AMP_MODELS[name] + (ctx.plm_flags(s.frozen) if name.startswith("PLM") else word)
    cfg = ctx.config("check", *flags, f"--amp={amp}", f"--batch_size={s.amp_batch}", "--lr=1e-3", "--plm_lr=1e-4")
    rt = setup_runtime(cfg, log=quiet)
    corpus = ctx.corpus(cfg)
    torch.manual_seed(0)
    model = Model(cfg, corpus.meta, corpus.news).to(rt.device)
    model.prepare(log=quiet)
    # -- training on 4 fixed batches, constant learning rate --
    model.train()
    stepper = Stepper(model, cfg, rt)
    stepper.scheduler = torch.optim.lr_scheduler.LambdaLR(stepper.optimizer, lambda step: 1.0)
    data = TrainDataset(corpus.behaviors("train"), cfg.negative_sample_num, seed=cfg.seed)
    batches = [data[idx].to(rt.device) for idx in islice(GlobalBatchSampler(len(data), cfg.batch_size, 0), 4)]
    losses = [stepper.step(model, batches[i % len(batches)]) for i in range(s.amp_steps)]
    # -- logits: autocast vs fp32 on the trained weights (eval mode, a dev batch): after training the logits are
    # spread, so the difference is measured against a scale the model uses (at initialisation they can be ~0) --
    model.eval()
    eval_batch = EvalDataset(corpus.behaviors("dev"), 32)[0].to(rt.device)
    with torch.no_grad():
        ref = model(eval_batch).logits
        with rt.autocast():
            low = model(eval_batch).logits
    real = eval_batch.candidate_mask
    scale = float(ref[real].abs().max())
    rel = float((low[real].float() - ref[real]).abs().max()) / max(scale, 1e-12)
    k = max(2, s.amp_steps // 5)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    finite = all(math.isfinite(x) for x in losses)
    ok = finite and last < first and rel <= AMP_RTOL[amp]
    row.status = "pass" if ok else "FAIL"
    row.value = f"loss {first:.3f} -> {last:.3f}; logits vs fp32 {rel:.1e}"
    row.goal = f"finite, loss down, logits within {AMP_RTOL[amp]:g} of fp32"
    scaler = f"; GradScaler scale {stepper.scaler.get_scale():g}" if amp == "fp16" else ""
    row.detail = (f"{s.amp_steps} steps on {len(batches)} fixed batches of {cfg.batch_size} (mean of the first and "
                  f"last {k}), losses {'finite' if finite else 'NOT FINITE'}; |logit difference| / max |fp32 logit| "
                  f"({scale:.2f}) on {int(real.sum())} dev candidates after training{scaler}")
    row.data = {"first": first, "last": last, "logit_rel_diff": rel, "finite": finite, "losses": losses}


LLM_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512)  # Qwen2.5-0.5B
LLM_SMOKE = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)


def row_llm(ctx: Context, row: Row, dtype: str, checkpointing: bool) -> None:
    """One LoRA training step of a random Qwen2.5-0.5B-shaped PLMMiner encoder: peak memory and time."""
    from transformers import Qwen2Config, Qwen2Model

    from MIND_corpus import CorpusMeta
    from newsEncoders import NEWS_ENCODERS

    shape = LLM_SMOKE if ctx.args.smoke else LLM_SHAPE
    folder = ctx.data / ("qwen2-smoke-random" if ctx.args.smoke else "qwen2-0.5b-random")
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        Qwen2Model(Qwen2Config(**shape)).to(torch.bfloat16).save_pretrained(folder)
    flags = [f"--plm_model_name={folder}", "--plm_frozen_layers=0", "--plm_lora_rank=16", "--plm_pooling=last",
             f"--plm_dtype={dtype}"] + (["--gradient_checkpointing"] if checkpointing else [])
    cfg = Config.from_args(flags)
    meta = CorpusMeta(vocab_size=10, category_num=5, subcategory_num=5, user_num=2, entity_num=1, news_num=10)
    n, length = (16, 8) if ctx.args.smoke else (1024, 32)
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    enc = NEWS_ENCODERS["PLMMiner"](cfg, meta).to(ctx.device).train()
    opt = torch.optim.Adam([p for p in enc.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(1, shape["vocab_size"], (n, length), device=ctx.device)
    news = {"plm_ids": ids, "plm_mask": torch.ones_like(ids)}
    times = []
    for _ in range(3):  # the first step warms up (kernels, allocator); the next two are timed
        ctx.sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = enc(news).float().pow(2).mean()
        loss.backward()
        opt.step()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    with_grad = [name for name, p in enc.plm.named_parameters() if p.grad is not None]
    ok = math.isfinite(float(loss)) and with_grad and all("lora_" in name for name in with_grad)
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else float("nan")
    row.status = "pass" if ok else "FAIL"
    row.value = (f"peak {peak:.2f} GiB, step {np.median(times[1:]):.3f} s" if ctx.cuda
                 else f"step {np.median(times[1:]):.3f} s (CPU: no GPU memory figure)")
    row.goal = "finite loss; gradients only in the LoRA adapters"
    row.detail = (f"{shape['num_hidden_layers']} layers x {shape['hidden_size']}, {n} news x {length} tokens, "
                  f"{sum(p.numel() for p in enc.plm.parameters() if p.requires_grad):,} adapter parameters")
    row.data = {"peak_gib": peak, "step_s": times[1:], "dtype": dtype, "checkpointing": checkpointing}
    del enc, opt
    if ctx.cuda:
        torch.cuda.empty_cache()


def row_cache_host(ctx: Context, row: Row) -> None:
    """Frozen-layer cache on the device vs forced into (pinned) host memory: same logits, same training step."""
    from plm import dropout_off

    s = ctx.sizes
    cfg = ctx.config("check", "--news_encoder=PLMNRMS", "--user_encoder=MHSA", *ctx.plm_flags(s.frozen),
                     f"--batch_size={s.amp_batch}")
    rt = setup_runtime(cfg, log=quiet)
    corpus = ctx.corpus(cfg)
    models = []
    for host in (False, True):
        torch.manual_seed(0)
        m = Model(cfg, corpus.meta, corpus.news).to(rt.device)
        m.prepare(log=quiet, host=host)
        models.append(m)
    on_device, on_host = models
    problems = []
    if on_device.news_encoder.frozen_table is None or on_device.news_encoder.frozen_table.device.type != rt.device.type:
        problems.append("the device table is not on the device")
    table = on_host.news_encoder.frozen_table_host
    if table is None or table.device.type != "cpu":
        problems.append("the host table is not in host memory")
    elif ctx.cuda and not table.is_pinned():
        problems.append("the host table is not pinned")
    eval_batch = EvalDataset(corpus.behaviors("dev"), 32)[0].to(rt.device)
    logits = []
    for m in models:
        m.eval()
        with torch.no_grad():
            logits.append(m(eval_batch).logits)
    real = eval_batch.candidate_mask
    logit_diff = float((logits[0][real] - logits[1][real]).abs().max())
    data = TrainDataset(corpus.behaviors("train"), cfg.negative_sample_num, seed=cfg.seed)
    batches = [data[idx].to(rt.device) for idx in islice(GlobalBatchSampler(len(data), cfg.batch_size, 0), 3)]
    losses, step_s = [], []
    for m in models:
        m.train()
        stepper = Stepper(m, cfg, rt)
        with dropout_off(m):
            ls = [stepper.step(m, b) for b in batches[:2]]
            ctx.sync()
            t0 = time.perf_counter()
            ls.append(stepper.step(m, batches[2]))
            ctx.sync()
        losses.append(ls)
        step_s.append(time.perf_counter() - t0)
    loss_diff = max(abs(a - b) for a, b in zip(*losses))
    if logit_diff > 1e-6 * max(1.0, float(logits[0][real].abs().max())):
        problems.append(f"logits differ by {logit_diff:.1e}")
    if loss_diff > 1e-6 * max(1.0, abs(losses[0][0])):
        problems.append(f"losses differ by {loss_diff:.1e}")
    row.status = "pass" if not problems else "FAIL: " + "; ".join(problems)
    row.value = f"logits differ by {logit_diff:.1e}, losses by {loss_diff:.1e}"
    row.goal = "equal outputs (<= 1e-6)"
    mib = table.numel() * 2 / 2**20 if table is not None else 0
    row.detail = (f"PLMNRMS-MHSA, {s.frozen} frozen layers, {on_device.news_num:,} news, cache {mib:,.0f} MiB fp16"
                  f"{' pinned' if ctx.cuda and table is not None and table.is_pinned() else ''}; 3 training steps "
                  f"each, dropout off; third step {step_s[0] * 1e3:.0f} ms (device) vs {step_s[1] * 1e3:.0f} ms (host)")
    row.data = {"logit_diff": logit_diff, "loss_diff": loss_diff, "step_s": step_s}


def log_subprocess(ctx: Context, title: str, cmd: list[str], proc_out: str, rc: Any) -> None:
    with open(ctx.out / "subprocess.txt", "a") as f:
        f.write(f"## {title}\n$ {' '.join(cmd)}\nexit status {rc}\n{proc_out[-6000:]}\n\n")


def run_bounded(cmd: list[str], timeout: float, env: dict) -> tuple[int | None, str]:
    """(exit status or None on timeout, stdout + stderr). The child gets its own process group, killed whole on
    timeout: torchrun's workers must not outlive their agent and keep the GPU."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def run_logged(ctx: Context, title: str, cmd: list[str], timeout: float, env: dict) -> tuple[int, str]:
    """A subprocess row's command within `timeout` (and the deadline), its output appended to subprocess.txt."""
    timeout = ctx.timeout(timeout)
    rc, out = run_bounded(cmd, timeout, env)
    log_subprocess(ctx, title, cmd, out, rc if rc is not None else f"timed out after {timeout:.0f} s")
    if rc is None:
        raise TimeoutError(f"{title}: timed out after {timeout:.0f} s (output in subprocess.txt)")
    return rc, out


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def row_pytest(ctx: Context, row: Row) -> None:
    s = ctx.sizes
    if importlib.util.find_spec("pytest") is None:
        row.status = "skipped: no pytest"
        row.detail = ("pytest is not installed here: install it (offline: pip install pytest-*.whl with its "
                      "dependencies iniconfig, pluggy, packaging) and rerun with --rows=pytest")
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *s.pytest_targets]
    timeout = ctx.timeout(s.pytest_timeout)
    rc, out = run_bounded(cmd, timeout, child_env(MIND_TEST_DEVICE=str(ctx.device)))
    (ctx.out / "pytest.txt").write_text(f"$ MIND_TEST_DEVICE={ctx.device} {' '.join(cmd)}\n\n{out}")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(lines) if " in " in ln and (
        "passed" in ln or "failed" in ln or "error" in ln or "skipped" in ln)), "no summary line")
    failed = [ln.split(" ")[1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    skipped: dict[str, int] = {}  # reason -> tests, from -rs lines "SKIPPED [n] file:line: reason"
    for ln in lines:
        if ln.startswith("SKIPPED ["):
            count, _, rest = ln[len("SKIPPED ["):].partition("]")
            reason = rest.strip().split(": ", 1)[-1]
            skipped[reason] = skipped.get(reason, 0) + (int(count) if count.isdigit() else 1)
    row.value = summary
    row.goal = "all pass (offline-package tests may skip)"
    if rc is None:
        row.status = f"FAIL: timed out after {timeout:.0f} s"
    else:
        row.status = "pass" if rc == 0 else "FAIL"
    row.detail = (f"MIND_TEST_DEVICE={ctx.device} {' '.join(s.pytest_targets)}; output in pytest.txt"
                  + "".join(f"; skipped {n}: {reason}" for reason, n in list(skipped.items())[:3])
                  + (f"; failed: {', '.join(failed[:8])}" + (" ..." if len(failed) > 8 else "") if failed else ""))
    row.data = {"rc": rc, "summary": summary, "failed": failed}


def row_torchrun(ctx: Context, row: Row) -> None:
    """torchrun --nproc_per_node=1 main.py: train 1 epoch -> dev -> test (prediction.zip) -> --resume to epoch 2."""
    s = ctx.sizes
    # generated here (by setup-check, unless --rows skipped it), not in the stages' times
    ctx.corpus(ctx.config("check", *ctx.nrms_flags))
    runs = Path(tempfile.mkdtemp(prefix="torchrun-", dir=ctx.data))
    try:
        common = ["--dataset=demo", f"--data_dir={ctx.data / 'check'}", *demo_flags(s.check),
                  f"--output_dir={runs}", f"--device={ctx.device}", "--news_encoder=MHSA", "--user_encoder=MHSA",
                  "--word_embedding_dim=64", "--head_num=4", "--head_dim=16", "--attention_dim=32", "--no-progress",
                  "--no-plot", "--no-tensorboard"]
        launch = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
                                    if s.torchrun else []), "main.py"]
        steps: list[str] = []

        def run(title: str, *flags: str) -> str:
            t0 = time.perf_counter()
            rc, out = run_logged(ctx, f"torchrun: {title}", launch + common + list(flags), s.torchrun_timeout,
                                 child_env())
            steps.append(f"{title} {time.perf_counter() - t0:.0f} s")
            if rc != 0:
                tail = [ln for ln in out.splitlines() if ln.strip()][-1:]
                raise RuntimeError(f"{title} exited with {rc}: {tail[0] if tail else ''} (subprocess.txt)")
            return out

        run("train", "--mode=train", "--epoch=1", f"--max_steps_per_epoch={s.torchrun_steps}", "--batch_size=32")
        run_dir = runs / "demo" / "MHSA-MHSA" / "#1"
        ckpt = run_dir / "MHSA-MHSA"
        if not ckpt.exists():
            raise RuntimeError(f"train wrote no checkpoint at {ckpt}")
        run("dev", "--mode=dev", f"--dev_model_path={ckpt}")
        metrics = json.loads((run_dir / "dev" / "metrics.json").read_text())["metrics"]
        run("test", "--mode=test", f"--test_model_path={ckpt}")
        if not (run_dir / "test" / "prediction.zip").exists():
            raise RuntimeError("test wrote no prediction.zip")
        run("resume", "--mode=train", f"--resume={run_dir}", "--epoch=2")
        epochs = [json.loads(ln)["epoch"] for ln in (run_dir / "dev_log.jsonl").read_text().splitlines() if ln]
        if epochs != [1, 2]:
            raise RuntimeError(f"after --resume dev_log.jsonl has epochs {epochs}, expected [1, 2]")
        row.status = "pass"
        row.value = f"dev AUC {metrics['auc']:.3f}; prediction.zip; resumed to epoch 2"
        row.goal = "every stage exits 0 with its files"
        row.detail = (f"NRMS (small), {s.torchrun_steps} steps/epoch on {ctx.device}; "
                      + ("1 process: main.py starts no process group (WORLD_SIZE=1), see the nccl row; "
                         if s.torchrun else "smoke: launched with plain python (the nccl row runs torchrun); ")
                      + ", ".join(steps))
    except Exception:
        row.detail = "finished stages: " + (", ".join(steps) or "none")
        raise
    finally:
        shutil.rmtree(runs, ignore_errors=True)


def row_nccl(ctx: Context, row: Row) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(Path(__file__)),
           "--nccl_probe"]
    rc, out = run_logged(ctx, "nccl probe", cmd, ctx.sizes.torchrun_timeout, child_env())
    line = next((ln for ln in out.splitlines() if ln.startswith("probe ")), "")
    row.status = "pass" if rc == 0 and "ok=True" in line else "FAIL"
    row.value = line.replace("probe ", "") or f"exit status {rc} (subprocess.txt)"
    row.goal = "all_reduce, all_gather_object, barrier"
    row.detail = ("torchrun --nproc_per_node=1, " + ("NCCL" if ctx.cuda else "gloo (no CUDA)")
                  + "; more processes need more GPUs")


# ----------------------------------------------------------------------------------------------------------
# Setup rows
# ----------------------------------------------------------------------------------------------------------

def row_setup_corpus(ctx: Context, row: Row, which: str) -> None:
    sizes = ctx.sizes.speed if which == "speed" else ctx.sizes.check
    cfg = ctx.config(which, *ctx.nrms_flags)
    corpus = ctx.corpus(cfg)
    beh = {split: corpus.behaviors(split)["stats"] for split in ("train", "dev")}
    row.status = "done"
    row.value = (f"{corpus.meta.news_num - 1:,} news, {beh['train']['impressions']:,} train / "
                 f"{beh['dev']['impressions']:,} dev impressions")
    row.detail = f"generated + preprocessed in {ctx.data / which} ({', '.join(f'{k}={v}' for k, v in sizes.items())})"
    if which == "speed" and not ctx.plm_folder.exists():
        t0 = time.perf_counter()
        write_random_bert(ctx.plm_folder, corpus.meta.vocab, ctx.sizes.bert)
        row.detail += f"; random PLM written to {ctx.plm_folder} in {time.perf_counter() - t0:.1f} s"


def row_setup_plm(ctx: Context, row: Row) -> None:
    """The random PLM folder (written by setup-speed, else here from the check corpus' words)."""
    if not ctx.plm_folder.exists():
        corpus = ctx.corpus(ctx.config("check", *ctx.nrms_flags))
        write_random_bert(ctx.plm_folder, corpus.meta.vocab, ctx.sizes.bert)
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(ctx.plm_folder)
    cfg = ctx.config("speed", "--news_encoder=PLMNRMS", "--user_encoder=MHSA", *ctx.plm_flags(ctx.sizes.frozen))
    t0 = time.perf_counter()
    corpus = ctx.corpus(cfg)
    lengths = np.asarray(corpus.news["plm_mask"]).sum(1)
    row.status = "done"
    row.value = f"{c.num_hidden_layers} layers, {c.hidden_size}-d, vocab {c.vocab_size:,}"
    row.detail = (f"random weights in {ctx.plm_folder}; titles tokenized in {time.perf_counter() - t0:.1f} s: "
                  f"{lengths[1:].mean():.1f} tokens per title on average (special tokens included), longest "
                  f"{lengths.max()} of --plm_max_length {cfg.plm_max_length}")


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------

def plan(ctx: Context) -> list[tuple[str, str, str, Callable[[Row], None]]]:
    """(key, section, name, fn) in running order: setup, the speed rows (within --budget), then the correctness
    rows (never skipped for the budget, only after --deadline)."""
    s = ctx.sizes
    layers = s.bert.get("num_hidden_layers", 12)
    rows = [
        ("setup-speed", "setup", "setup: MIND-small-sized corpus", lambda r: row_setup_corpus(ctx, r, "speed")),
        ("setup-check", "setup", "setup: small corpus (correctness rows)", lambda r: row_setup_corpus(ctx, r, "check")),
        ("setup-plm", "setup", "setup: random BERT-base-sized PLM", lambda r: row_setup_plm(ctx, r)),
        ("speed-plm-full", "speed", f"PLMNRMS-MHSA train, all {layers} layers fine-tuned",
         lambda r: row_speed_plm(ctx, r, frozen=False)),
        ("speed-plm-frozen", "speed", f"PLMNRMS-MHSA train, {s.frozen} of {layers} frozen + cache",
         lambda r: row_speed_plm(ctx, r, frozen=True)),
        ("speed-dev-plm", "speed", f"dev evaluation, PLMNRMS-MHSA ({s.frozen} frozen + cache)",
         lambda r: row_speed_dev(ctx, r, "plm_frozen")),
        ("speed-nrms", "speed", f"NRMS train ({s.word_dim}-d)", lambda r: row_speed_nrms(ctx, r)),
        ("speed-dev-nrms", "speed", "dev evaluation, NRMS", lambda r: row_speed_dev(ctx, r, "nrms")),
        ("speed-compile", "speed", "NRMS train, --compile", lambda r: row_speed_nrms(ctx, r, compiled=True)),
        ("pytest", "correctness", f"model-level tests on {ctx.device}", lambda r: row_pytest(ctx, r)),
    ]
    for name in AMP_MODELS:
        for amp in ("bf16", "fp16"):
            rows.append((f"amp-{amp}-{name}", "correctness", f"--amp={amp} {name}",
                         lambda r, name=name, amp=amp: row_amp(ctx, r, name, amp)))
    rows += [
        ("llm-lora-fp32", "correctness", "LLM (Qwen2.5-0.5B shape) + LoRA, fp32",
         lambda r: row_llm(ctx, r, "fp32", False)),
        ("llm-lora-bf16", "correctness", "LLM + LoRA, --plm_dtype=bf16", lambda r: row_llm(ctx, r, "bf16", False)),
        ("llm-lora-bf16-ckpt", "correctness", "LLM + LoRA, bf16 + --gradient_checkpointing",
         lambda r: row_llm(ctx, r, "bf16", True)),
        ("cache-host", "correctness", "frozen-layer cache: device vs pinned host", lambda r: row_cache_host(ctx, r)),
        ("torchrun", "correctness", "torchrun --nproc_per_node=1: train, dev, test, resume",
         lambda r: row_torchrun(ctx, r)),
        ("nccl", "correctness", "process group under torchrun", lambda r: row_nccl(ctx, r)),
    ]
    return rows


ROW_KEYS = ("setup-speed, setup-check, setup-plm, speed-plm-full, speed-plm-frozen, speed-dev-plm, speed-nrms, "
            "speed-dev-nrms, speed-compile, pytest, amp-{bf16,fp16}-{NRMS,PLMNRMS-MHSA,PLMMiner-MINER}, llm-lora-fp32, "
            "llm-lora-bf16, llm-lora-bf16-ckpt, cache-host, "
            "torchrun, nccl")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, in seconds (what the tests run)")
    p.add_argument("--out", default=None, help="folder of gpu.md, gpu.json, profile.txt, pytest.txt, subprocess.txt "
                   "(default bench/gpu_out, bench/gpu_out-smoke with --smoke; git-ignored)")
    p.add_argument("--data_dir", default=None,
                   help="generated corpora and the random PLM (default data/bench/gpu, data/bench/gpu-smoke)")
    p.add_argument("--device", default="auto", help="auto (cuda if available; cpu with --smoke) | cpu | cuda | cuda:N")
    p.add_argument("--budget", type=float, default=330.0,
                   help="seconds from the start after which speed rows not yet started are 'skipped: budget'")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds from the start after which no row starts and subprocess timeouts are cut to end "
                        "before it (default 540, under a 10-minute command limit; smoke: 3600)")
    p.add_argument("--rows", default="", help=f"comma-separated prefixes of the row keys to run (default all): "
                   f"{ROW_KEYS}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per speed row (default 20; smoke 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; smoke: 1)")
    p.add_argument("--nccl_probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.nccl_probe:
        nccl_probe()
        return 0
    if args.smoke and args.device == "auto":
        args.device = "cpu"
    threads = args.threads if args.threads is not None else (1 if args.smoke else 0)
    if threads > 0:  # smoke: 1 thread (on a busy 2-core machine a second thread makes every op wait for it)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the subprocess rows too
    import transformers

    transformers.logging.set_verbosity_error()  # no per-model weight-loading bars between the rows
    transformers.logging.disable_progress_bar()
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    sizes = SMOKE if args.smoke else FULL
    if args.deadline is None:
        args.deadline = 3600.0 if args.smoke else 540.0
    if args.steps is not None:
        if args.steps < 1:
            p.error(f"--steps must be >= 1, got {args.steps}")
        sizes = dataclasses.replace(sizes, steps=args.steps)
    suffix = "-smoke" if args.smoke else ""
    args.out = args.out or str(ROOT / "bench" / f"gpu_out{suffix}")
    args.data_dir = args.data_dir or str(ROOT / "data" / "bench" / f"gpu{suffix}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device={args.device}: CUDA is not available on this machine; use --smoke (CPU) or --device=cpu")
    ctx = Context(args, sizes)
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("profile.txt", "pytest.txt", "subprocess.txt"):  # this run's logs only (files this script writes)
        (out / name).unlink(missing_ok=True)
    header = {"device": ctx.device_name if ctx.cuda else f"CPU ({os.cpu_count()} cores)", "torch": torch.__version__,
              "cuda": torch.version.cuda, "peak_tflops": ctx.peak, "smoke": args.smoke,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget, "deadline_s": args.deadline,
              "command": " ".join(["python bench/gpu.py", *(argv if argv is not None else sys.argv[1:])])}
    print(f"bench/gpu.py on {header['device']} (torch {torch.__version__}, CUDA {torch.version.cuda}); out {out}, "
          f"data {args.data_dir}", flush=True)
    table = Table(out, header)
    wanted = [w.strip() for w in args.rows.split(",") if w.strip()]
    for key, section, name, fn in plan(ctx):
        if wanted and not any(key.startswith(w) for w in wanted):
            continue
        row = Row(key=key, name=name)
        needs = sizes.compile_needs_s if key == "speed-compile" else 0.0  # compilation alone takes about a minute
        if ctx.elapsed() > args.deadline:
            row.status = "skipped: deadline"
            row.detail = f"{ctx.elapsed():.0f} s elapsed of the --deadline {args.deadline:.0f} s"
            table.add(row)
            continue
        if section == "speed" and ctx.elapsed() + needs > args.budget:
            row.status = "skipped: budget"
            row.detail = (f"{ctx.elapsed():.0f} s elapsed of the --budget {args.budget:.0f} s"
                          + (f" (this row needs about {needs:.0f} s)" if needs else ""))
            table.add(row)
            continue
        t0 = time.perf_counter()
        try:
            fn(row)
        except Exception as e:  # one failing row must not stop the table
            row.status = "FAIL"
            row.detail = (first_line(e) + ("; " + row.detail if row.detail else ""))
            row.data["traceback"] = traceback.format_exc()[-3000:]
        row.seconds = time.perf_counter() - t0
        table.add(row)
        ctx.free()
    total = ctx.elapsed()
    header["total_seconds"] = total
    table.write()
    failed = [r.name for r in table.rows if r.status.startswith("FAIL")]
    missed = [r.name for r in table.rows if r.status.startswith("missed")]
    print(f"\n{len(table.rows)} rows: {len(failed)} failed, {len(missed)} goals missed"
          + (f" ({'; '.join(missed)})" if missed else "") + f"; wrote {out / 'gpu.md'} and {out / 'gpu.json'}")
    print(f"total wall time {total:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
