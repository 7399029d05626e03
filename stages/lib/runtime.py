"""The process's environment, as torchvision's references keep it in ``utils.py``: the DDP process
group, the rank, the device and the autocast dtype, the seed. No training machinery: ``predict``
imports this to choose its device without importing the training loop."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

DDP_TIMEOUT_ENV = "CLICKDOG_DDP_TIMEOUT_S"


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """(rank, world_size); joins the process group when started by torchrun:
    nccl for CUDA training, gloo for CPU training (also on a GPU host)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device in ("auto", "cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # a rank that hangs (a dead node, a stuck file system) must end the run, not leave the others
        # waiting in a collective for the backends' defaults (30 min for gloo); torchrun then stops every
        # rank with a non-zero exit. CLICKDOG_DDP_TIMEOUT_S: longer for slow first epochs on big data
        dist.init_process_group(backend, timeout=timedelta(seconds=float(os.environ.get(DDP_TIMEOUT_ENV, 600))))
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def choose_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was asked for but no CUDA GPU is visible")
        return torch.device("cuda", torch.cuda.current_device())
    if name != "cpu":
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (auto | fp32 | bf16 | fp16), None = fp32."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if _cpu_has_native_bf16() else None
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 is for CUDA; use bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
