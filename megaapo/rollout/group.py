"""The weight-sync process group: the trainer's sending rank(s) + every engine worker, outside torch.distributed's
global state (the trainer's own groups and vLLM's are untouched).

Called on both ends: by `megaapo.rollout.sync.WeightSender` (trainer, rank 0) and `megaapo.rollout.worker`
(each vLLM worker, ranks 1..). gloo on CPU; on GPUs NCCL through vLLM's `PyNcclCommunicator`, the communicator
vLLM's own weight transfer uses. Both expose one operation here, `broadcast(tensor, src) -> handle.wait()`.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch


class _Done:
    def wait(self):
        return True


class SyncGroup:
    """A broadcast-only group. `device` is where tensors live: cpu (gloo) or a cuda device (NCCL)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: torch.device,
                 timeout_s: float, listen_socket: socket.socket | None = None):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        timeout = timedelta(seconds=timeout_s)
        if self.device.type == "cpu":
            from vllm.distributed.utils import stateless_init_torch_distributed_process_group

            self._pg = stateless_init_torch_distributed_process_group(
                host, port, rank, world_size, backend="gloo", timeout=timeout, listen_socket=listen_socket)
            self._nccl = None
        else:
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size,
                                              store_timeout=int(timeout_s), listen_socket=listen_socket)
            self._pg = None
            self._nccl = PyNcclCommunicator(pg, device=self.device)

    def broadcast(self, tensor: torch.Tensor, src: int):
        """Start broadcasting `tensor` from rank `src`; returns a handle whose wait() blocks until it is done.

        gloo runs the transfer on its own thread, so the caller can pack the next bucket meanwhile; NCCL enqueues
        on the current stream, which already orders later copies into the same buffer after the transfer."""
        if self._nccl is not None:
            self._nccl.broadcast(tensor, src=src)
            return _Done()
        return self._pg.broadcast(tensor, src)

    def close(self) -> None:
        if self._pg is not None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            try:
                stateless_destroy_torch_distributed_process_group(self._pg)
            except Exception:   # a peer already gone: nothing left to release here
                pass
            self._pg = None
        self._nccl = None


def free_listen_socket(host: str) -> socket.socket:
    """A bound, listening TCP socket on an OS-chosen port: the store is created on it directly, so no other process
    can take the port between choosing and binding it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host if host not in ("", "localhost") else "127.0.0.1", 0))
    s.listen()
    return s


def route_address(peer_host: str) -> str:
    """The local address the OS would use to reach `peer_host` (a UDP connect sends no packet)."""
    if peer_host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer_host, 9))
        return s.getsockname()[0]
