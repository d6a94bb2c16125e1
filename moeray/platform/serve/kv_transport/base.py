"""The KV transport interface: what a prefill replica's sender and a decode replica's receiver
do, the tickets that ride in the prefill call's reply, and what the transports share.

Legend: L cached layers, T tokens, C kv_lora_rank, R qk_rope_head_dim (see engine/disagg.py).

The decode replica sends its `DecodeEndpoint` with each prefill call; the prefill replica's
`KVSender.send` turns the exported rows into a *ticket* that rides back in the call's return value;
the decode replica's `KVReceiver.receive(ticket)` turns the ticket back into rows. Only the rows the
decode side lacks travel (the decode replica asks for rows from the end of its cached prefix).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch

from moeray.platform.engine.disagg import KVRows


@dataclass(frozen=True)
class DecodeEndpoint:
    """Where a decode replica receives KV: sent with every prefill call."""

    replica_id: str
    node_id: str | None = None  # Ray node id (rdt: where the dst relay must live)
    host: str = "127.0.0.1"  # channel: the TCPStore host
    store_port: int | None = None  # channel: the TCPStore port
    # channel: the decode replica's physical GPU (device_identity); a prefill replica on the same
    # GPU (fractional --gpus-per-replica) cannot pair with it over NCCL
    device_id: str | None = None


class KVSender(Protocol):
    """The prefill side of a transport."""

    name: str

    async def send(self, request_id: str, rows: KVRows, dest: DecodeEndpoint | None) -> Any:
        """Start moving `rows` to the decode replica at `dest`; return the ticket that the
        prefill call's reply carries (the rows themselves for the object store)."""
        ...

    def close(self) -> None: ...


class KVReceiver(Protocol):
    """The decode side of a transport."""

    name: str

    def endpoint(self) -> DecodeEndpoint:
        """What this replica sends with each prefill call."""
        ...

    def expect(self, request_id: str) -> Future | None:
        """Called right before the prefill call: a transport that can receive before the reply
        arrives (the channel) starts waiting for the request's rows; the others return None."""
        ...

    def cancel(self, request_id: str) -> None:
        """The prefill call failed or the request went away: end what `expect` started."""
        ...

    async def receive(self, ticket: Any) -> KVRows:
        """The rows of `ticket`, on this replica's device."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RDTTicket:
    start: int
    rows_ref: Any  # ObjectRef of (kv_LTC, pe_LTR), produced by the dst relay on the decode node
    nbytes: int


@dataclass(frozen=True)
class ChannelTicket:
    start: int
    channel: str  # the sender's id: names the pair's rendezvous prefix in the decode's store
    tag: int  # kv rows travel under `tag`, rope rows under `tag + 1`
    kv_shape: tuple[int, ...]
    pe_shape: tuple[int, ...]
    dtype: str
    nbytes: int
    request_id: str = ""  # matches a copy from the ticket queue to its `expect`


def device_identity(device: torch.device | str) -> str | None:
    """The physical GPU behind `device` (its UUID, the same in every process whatever
    CUDA_VISIBLE_DEVICES numbers it), or None off GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


def backend_for(device: torch.device | str) -> str:
    """gloo for CPU tensors, nccl for CUDA tensors."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def pair_process_group(backend: str, store: Any, rank: int, timeout_s: float, device: torch.device):
    """A 2-rank gloo or nccl group on `store`: the channel's, and the raw send/recv baseline's."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    pg = dist.ProcessGroupNCCL(store, rank, 2, opts)
    return pg


def check_timeout(timeout_s: float) -> float:
    """A transport's wait bound in seconds: ValueError unless > 0."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s} must be > 0")
    return timeout_s
