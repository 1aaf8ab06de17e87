"""Process groups for the learner, created once and passed explicitly (`ParallelGroups`).

`init_distributed` starts torch.distributed (NCCL on GPU, gloo on CPU), lets megatron-core build its tensor/pipeline/
data-parallel groups, and returns them in one object together with megatron's `ProcessGroupCollection`, which the
model and the pipeline schedule receive as an argument. Nothing else in megaapo calls `parallel_state.get_*`.
Called by the learner's owners: train.py, sft, `megaapo check parity`, tests.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelGroups:
    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup
    embd: dist.ProcessGroup | None     # first + last pipeline stage: tied-embedding gradient all-reduce
    pgc: object                        # megatron.core.process_groups_config.ProcessGroupCollection
    device: torch.device

    @property
    def tp_rank(self) -> int:
        return self.tp.rank()

    @property
    def tp_size(self) -> int:
        return self.tp.size()

    @property
    def pp_rank(self) -> int:
        return self.pp.rank()

    @property
    def pp_size(self) -> int:
        return self.pp.size()

    @property
    def dp_rank(self) -> int:
        return self.dp.rank()

    @property
    def dp_size(self) -> int:
        return self.dp.size()

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def loss_visible(self) -> bool:
        """The rank that sees losses and owns metrics and checkpoint metadata: first rank of the last stage."""
        return self.last_stage and self.tp_rank == 0 and self.dp_rank == 0


def init_distributed(tp: int = 1, pp: int = 1, backend: str = "auto", timeout_s: float = 600.0) -> ParallelGroups:
    """Start torch.distributed from torchrun's environment (or a single process) and build the TP x PP x DP groups."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from .cpu_shim import install

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        install()
    if not dist.is_initialized():
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "WORLD_SIZE" in os.environ:   # torchrun / our spawn helper: its rendezvous address
            init = f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ['MASTER_PORT']}"
        else:
            # A single process picks a fresh port and leaves the environment alone, so that processes it starts
            # (and later single-process runs) never inherit a port that is still bound.
            init = f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by parallel.tp x parallel.pp = {tp} x {pp}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(1234)
    return ParallelGroups(tp=pgc.tp, pp=pgc.pp, dp=pgc.dp, embd=getattr(pgc, "embd", None), pgc=pgc, device=device)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, port, *args) in world_size fresh processes (tests, `megaapo check`); raises if any
    rank fails. Each process reads its rank from the arguments and sets the torch.distributed environment itself."""
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=(world_size, _free_port(), *args), nprocs=world_size, start_method="spawn",
                       join=True)


def set_rank_env(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def share(obj, groups=None):
    """Rank 0's object on every trainer rank (rank 0 drives the engines and scores; every rank trains)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
