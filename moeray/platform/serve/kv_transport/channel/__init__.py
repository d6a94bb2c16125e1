"""The "channel" KV transport: a persistent torch.distributed group of two ranks between a
prefill and a decode replica process, no relay (`sender.py`, `receiver.py`; this module holds the
design and the ticket queue's names).

Legend: L cached layers, T tokens, C kv_lora_rank, R qk_rope_head_dim (see engine/disagg.py).

Set up once per (prefill, decode) pair: the decode replica hosts a TCPStore for the rendezvous,
then the rows move by plain send/recv under a per-transfer tag, and Ray carries only the ticket
(shapes, dtype, tag). gloo on CPU (tested); nccl on GPU is the same code with the tensors on the
device and sends issued in tag order (NCCL matches point-to-point calls in issue order, not by tag).

Early receive. A receive posted only once the prefill's Serve reply has brought the ticket waits
~1.6 ms per transfer on 2x H200, twice what raw NCCL needs for a 4K-token V3 prompt (288 MB in
0.8 ms). So the ticket also goes through a queue in the decode replica's TCPStore, and the decode
side posts the receive when it pops it there (288 MB in 1.37 ms; benchmarks/notes-serve.md):
  * `ChannelSender.send` pushes the ticket (TCPStore queue_push, which does not wait for an
    answer) in `send` itself, before the send thread posts the send; the first send to a decode
    replica connects its store client on the send thread and pushes there, before the rendezvous
    (else the sender would wait in the rendezvous for a decode side that waits for the ticket).
  * The decode replica calls `receiver.expect(request_id)` just before it calls the prefill. One
    dispatcher thread per receiver pops the queue (blocking pop, its own client); a ticket whose
    request is expected gets its receive posted at once, and the rows land in the expectation's
    future. Waiting costs no thread and no connection per request.
  * The ticket still rides in the reply: it is the source of truth. `receive(ticket)` returns the
    expectation's rows when the queued ticket was the same (channel, tag, shapes, ... all equal);
    otherwise (the reply came first, the expectation expired, nothing was expected) it receives
    the reply's ticket itself, and a queued copy that comes later is ignored.
  * `cancel(request_id)` (the prefill call failed, or the decode request went away) ends the
    expectation; a ticket of that request that still comes within the transport timeout is
    received and dropped, so the send completes instead of waiting out its timeout.
  * An expectation that gets neither `receive` nor `cancel` expires after the transport timeout
    (checked on every expect / receive / cancel / queued ticket).
Ordering (nccl: receives must be posted in the sender's tag order per channel). The sender
allocates tags and pushes tickets on its event loop, and posts its sends from one thread, both in
tag order (only the order of the sends matters for correctness). On the decode side every
receive, whether posted for a queued ticket or by `receive(ticket)`, waits in `_recv_blocking` on
the `_next_tag` condition until its tag is the channel's next (tags are per sender, so ascending
per channel). An expectation owns no tag until its ticket arrives and waits in no thread, so one
whose ticket never comes holds up nothing. Receives run on 8 threads for both backends: with one
thread, a receive for tag k+2 whose reply came first would hold the only thread while tag k
queued behind it until the timeout (8 such inversions at once still would; queued tickets arrive
in push order, which is tag order). What can still hold a channel up is a tag that was sent and
never received: its ticket reached neither the queue in time nor a `receive`.
"""

# The decode replica's ticket queue (TCPStore queue_push / queue_pop): every sender pushes every
# ticket; one dispatcher thread per receiver pops them. A pop removes the item, so nothing is left
# to clean up, and one client serves any number of pending requests (a client per waiting request
# does not scale: 32 clients connecting at once stall 5 s in connect on a 2-core host).
TICKET_QUEUE = "kvq"
QUEUE_STOP = b"stop"  # pushed by close() to end the dispatcher; pickled tickets start with b"\x80"
IDLE_POP_S = 3600.0  # an idle pop times out (and logs a socket warning) at most once an hour
