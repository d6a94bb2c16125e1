"""KV transfer from a prefill replica to a decode replica, behind one interface.

    base.py          the interface: KVSender / KVReceiver, DecodeEndpoint, the tickets, and what
                     the transports share
    object_store.py  "object_store": the ticket *is* the rows; Ray carries them in the prefill
                     call's reply. Works everywhere; the default.
    rdt.py           "rdt": Ray Direct Transport through a pair of relay actors per (prefill,
                     decode) replica pair (Serve replicas cannot use `tensor_transport`)
    channel/         "channel": a persistent torch.distributed pair between the two replica
                     processes; only the ticket rides in the reply, and the decode side posts its
                     receive when the ticket reaches its TCPStore queue
    factory.py       make_sender / make_receiver by `ServeConfig.kv_transport`
    p2p.py           the raw send/recv floor the transports are benchmarked against

If any step fails (relay or peer gone, timeout), the decode replica recomputes the prefill itself
(`serve/worker.py`), so the request still completes.
"""
