"""The "object_store" KV transport: the ticket *is* the rows, and Ray carries them in the prefill
call's reply. Works everywhere; the default."""

from __future__ import annotations

from typing import Any

import torch

from moeray.platform.engine.disagg import KVRows
from moeray.platform.serve.kv_transport.base import DecodeEndpoint


class ObjectStoreSender:
    name = "object_store"

    async def send(self, request_id: str, rows: KVRows, dest: DecodeEndpoint | None) -> KVRows:
        return rows

    def close(self) -> None:
        pass


class ObjectStoreReceiver:
    name = "object_store"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def endpoint(self) -> DecodeEndpoint:
        return DecodeEndpoint(replica_id="local")

    def expect(self, request_id: str) -> None:
        """No early receive: the rows come in the prefill call's reply."""
        return None

    def cancel(self, request_id: str) -> None:
        pass

    async def receive(self, ticket: Any) -> KVRows:
        if not isinstance(ticket, KVRows):
            raise TypeError(
                f"object_store receiver got a {type(ticket).__name__} ticket, not KVRows "
                "(prefill and decode configured with different kv_transport?)"
            )
        return ticket

    def close(self) -> None:
        pass
