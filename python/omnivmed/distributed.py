"""The processes of one run: how they join a process group and wait for or agree with each
other. Training and benchmark runs both start here, from one plain process, torchrun, the
deepspeed launcher or several nodes (a DeepSpeed hostfile)."""

from __future__ import annotations

import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Initialize torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU). Without
    a launcher, a single-process group is made. Returns (rank, world_size)."""
    import deepspeed

    if "RANK" not in os.environ:  # a plain `python`/`omnivmed-train` process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))  # fmt: skip
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def join_launched_group(backend: str = "gloo") -> tuple[int, int]:
    """(rank, world_size) as the launcher (torchrun) set them, (0, 1) without one. Only
    with more than one process is a group joined (unless one is up already): `backend`
    gloo suffices where the group only carries barriers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return int(os.environ.get("RANK", "0")), world


def barrier() -> None:
    """Wait for every rank; nothing to wait for without a process group."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_ranks_agree(flag: bool) -> bool:
    """True only when every rank's flag is true (one all-reduce)."""
    vote = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.cuda.is_available():
            vote = vote.cuda()
        torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MIN)
    return bool(vote.item())
