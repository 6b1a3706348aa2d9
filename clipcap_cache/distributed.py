"""Running as several processes under `torchrun`: the one place that knows about ranks.

    torchrun --nproc-per-node 8 --no-python clipcap train data/coco_vitb32.h5 --out runs/coco

torchrun starts one process per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE. `setup(device)`
joins the process group (NCCL on CUDA, gloo on the CPU) and gives each process its own GPU. Every
rank runs the same code; only the main process (rank 0) writes files and logs to the console, and
`barrier()` makes the others wait where a file must exist before they go on. Without torchrun,
everything here is a no-op and the world has one process.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clipcap_cache.errors import ClipcapError


@dataclass(frozen=True)
class World:
    """Where this process stands among those that torchrun started."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """Read this process's rank and the world size from torchrun's environment."""
    try:
        return World(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            size=int(os.environ.get("WORLD_SIZE", 1)),
        )
    except ValueError:
        raise ClipcapError("RANK, LOCAL_RANK and WORLD_SIZE must be integers") from None


def is_main_process() -> bool:
    return world().is_main


def setup(device: torch.device) -> torch.device:
    """Join the process group if torchrun started several processes; returns this rank's device.

    On CUDA each process takes the GPU of its LOCAL_RANK.
    """
    current = world()
    if device.type == "cuda":
        if current.local_rank >= torch.cuda.device_count():
            raise ClipcapError(
                f"LOCAL_RANK {current.local_rank} has no GPU: this node has "
                f"{torch.cuda.device_count()}; start at most that many processes per node"
            )
        device = torch.device("cuda", current.local_rank)
        torch.cuda.set_device(device)
    if current.size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Ranks wait at barriers while the main process validates or gathers: allow for that.
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(hours=2),
            device_id=device if device.type == "cuda" else None,
        )
    return device


def seed_rank_stream(seed: int) -> None:
    """Give every rank a random stream of its own (dropout), as nanoGPT and open_clip do.

    Called once the model's initial weights are drawn from the common seed. Rank r > 0 reseeds
    with `seed + r`; rank 0 (and a single process) continues the common stream, so one process
    trains exactly as it always has. Keyed randomness, such as SCST's sampling noise, does not
    come from this stream and stays the same on every rank.
    """
    rank = world().rank
    if rank > 0:
        torch.manual_seed(seed + rank)
        if torch.cuda.is_available():
            torch.cuda.manual_seed(seed + rank)


def barrier() -> None:
    """Wait until every rank gets here (a no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The largest value of a tensor over all ranks, in place (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(value) -> list:
    """Every rank's `value`, in rank order (a one-item list in one process)."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value):
    """The main process's `value`, on every rank (unchanged in one process)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
