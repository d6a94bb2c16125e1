"""The KV transport of a replica, by name (`ServeConfig.kv_transport`)."""

from __future__ import annotations

import torch

from moeray.platform.config import KV_TRANSPORTS as TRANSPORTS
from moeray.platform.serve.kv_transport.base import KVReceiver, KVSender, backend_for
from moeray.platform.serve.kv_transport.channel.receiver import ChannelReceiver
from moeray.platform.serve.kv_transport.channel.sender import ChannelSender
from moeray.platform.serve.kv_transport.object_store import (
    ObjectStoreReceiver,
    ObjectStoreSender,
)
from moeray.platform.serve.kv_transport.rdt import RDTReceiver, RDTSender


def make_sender(
    transport: str, device: torch.device | str = "cpu", *, timeout_s: float = 30.0
) -> KVSender:
    if transport == "object_store":
        return ObjectStoreSender()
    if transport == "rdt":
        return RDTSender(backend_for(device), timeout_s=timeout_s)
    if transport == "channel":
        return ChannelSender(backend_for(device), timeout_s=timeout_s, device=device)
    raise ValueError(f"kv_transport={transport!r}: accepted {TRANSPORTS}")


def make_receiver(
    transport: str,
    replica_id: str,
    device: torch.device | str = "cpu",
    *,
    host: str = "127.0.0.1",
    timeout_s: float = 30.0,
) -> KVReceiver:
    if transport == "object_store":
        return ObjectStoreReceiver(device)
    if transport == "rdt":
        return RDTReceiver(replica_id, device, timeout_s=timeout_s)
    if transport == "channel":
        return ChannelReceiver(
            replica_id, backend_for(device), host=host, timeout_s=timeout_s, device=device
        )
    raise ValueError(f"kv_transport={transport!r}: accepted {TRANSPORTS}")
