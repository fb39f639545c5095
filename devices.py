"""Devices and processes: CPU / one GPU / torchrun DDP set-up, mixed precision, and the collectives the loop and
the evaluation share. Legend: W world size."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch

import util

# Rank-0-only work (building the corpus cache, computing metrics, writing checkpoints) makes the other ranks wait
# on a gloo group with this long timeout; the default group keeps the short --dist_timeout, so a rank whose peer
# died inside a training collective fails fast.
RANK0_WORK_TIMEOUT = timedelta(hours=3)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp: str = "off"  # resolved --amp: off | bf16 | fp16
    wait_group: Any = None  # gloo group with RANK0_WORK_TIMEOUT (None in a single process)
    owns_group: bool = True  # this runtime started the process group (--mode=tune keeps one across its trials)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """Mixed precision for forward passes (training and evaluation); parameters stay fp32."""
        if self.amp == "off":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AMP_DTYPES[self.amp])


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`--device` -> torch.device; under torchrun (`local_rank` given) a CUDA process takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device=cpu or auto")
    if device.type == "cuda" and local_rank is not None:
        if device.index is not None:
            raise ValueError(f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; pass --device=cuda "
                             f"or auto (choose GPUs with CUDA_VISIBLE_DEVICES)")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible: start "
                             f"at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
    return device


def _cuda_has_bf16(device: torch.device) -> bool:
    """Native bf16 (Ampere or newer); emulated bf16 on older GPUs is slower than fp16 with loss scaling."""
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch without the keyword
            return torch.cuda.is_bf16_supported()


def resolve_amp(amp: str, device: torch.device, log: Callable = print) -> str:
    """`--amp` -> off | bf16 | fp16. auto: bf16 on GPUs with native bf16, fp16 on older GPUs, off elsewhere."""
    if amp == "auto":
        if device.type == "cuda":
            return "bf16" if _cuda_has_bf16(device) else "fp16"
        return "off"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"--amp=fp16 needs a CUDA device (fp16 training needs loss scaling, done by the CUDA "
                         f"GradScaler); on {device.type} use --amp=bf16 or --amp=off")
    if amp == "bf16" and device.type == "cuda" and not _cuda_has_bf16(device):
        raise ValueError(f"--amp=bf16: {torch.cuda.get_device_name(device)} has no native bf16; use --amp=fp16")
    if amp == "bf16" and device.type == "cpu":
        log("WARNING: --amp=bf16 on the CPU: allowed, but usually slower than fp32 on CPUs without native bf16 "
            "matrix units (the default on CPU is --amp=off)")
    return amp


def setup_runtime(config, log: Callable = print) -> Runtime:
    """Single process unless torchrun set WORLD_SIZE > 1; then one process per GPU (nccl) or CPU process (gloo).

    The rendezvous comes from torchrun's environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE): no port is fixed here.
    """
    rank, local_rank, world_size = util.dist_env()
    distributed = world_size > 1
    if distributed and config.mode == "train" and config.batch_size % world_size:
        lower = config.batch_size // world_size * world_size
        raise ValueError(f"--batch_size={config.batch_size} is the global batch (all {world_size} processes "
                         f"together) and must be divisible by the number of processes; use e.g. "
                         f"--batch_size={lower or world_size} or {lower + world_size}")
    device = resolve_device(config.device, local_rank if distributed else None)
    amp = resolve_amp(config.amp, device, log if rank == 0 else (lambda *a: None))
    rt = Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank, amp=amp)
    if distributed:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        rt.owns_group = not dist.is_initialized()
        if rt.owns_group:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=config.dist_timeout),
                                    device_id=device if device.type == "cuda" else None)
        rt.wait_group = dist.new_group(backend="gloo", timeout=RANK0_WORK_TIMEOUT)
        if rank == 0 and rt.owns_group:
            log(f"distributed: {world_size} processes, backend {backend}, rank 0 on {device}")
    return rt


def shutdown_runtime(rt: Runtime) -> None:
    """Leave the process group after a normal end (after an error the process just exits: torchrun stops the rest)."""
    if rt.distributed and util.dist_active():
        import gc

        import torch.distributed as dist

        # A DDP wrapper left in a reference cycle (the trainer and its callbacks) still holds the group's reducer;
        # destroying the group under it made a test script abort at exit now and then ("terminate called without an
        # active exception"). Collect it first, on every rank, then meet.
        gc.collect()
        util.barrier(rt.wait_group)
        if rt.owns_group:
            dist.destroy_process_group()


def _sum_over_ranks(t: torch.Tensor, rt: Runtime, to_main_only: bool = False) -> torch.Tensor:
    """Element-wise sum over ranks of tensors that are zero wherever another rank owns the entry: adding zeros
    is exact, so the result is bit-identical to one process computing everything."""
    if not rt.distributed:
        return t
    import torch.distributed as dist

    dtype = t.dtype
    # gloo lacks some reductions in half precision; widening is exact, and so is narrowing back.
    work = t.float() if t.is_floating_point() and dtype != torch.float32 else t
    work = work.to(rt.device).contiguous()
    if to_main_only:
        dist.reduce(work, dst=0, op=dist.ReduceOp.SUM)
    else:
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(dtype)
