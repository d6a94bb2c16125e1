"""Engine test helpers shared by the CPU and GPU tests."""

import torch

from moeray.platform.config import tiny
from moeray.platform.engine.bench import train_on_cycle
from moeray.platform.engine.runner import ModelRunner
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer


def trained_on_cycle(vocab: int = 256, cycle_len: int = 48):
    """A 2-layer tiny model trained briefly (~3 s on CPU) on a cyclic text, with its MTP block,
    and five prompts: three on the cycle, two off it. Its drafts follow the cycle, so they are
    accepted where the output does (prompts off the cycle join it). -> (model, prompts)."""
    cfg = tiny().replace(num_hidden_layers=2, vocab_size=vocab, eos_token_id=None)
    model = Transformer(cfg)
    model.reset_parameters(seed=3)
    g = torch.Generator().manual_seed(0)
    cycle = torch.randperm(vocab, generator=g)[:cycle_len]
    train_on_cycle(model, cycle, 30, torch.device("cpu"), seq_len=48, batch=8, lr=3e-3)
    on = [
        cycle[(s + torch.arange(n)) % cycle_len].tolist() for s, n in ((3, 9), (20, 30), (40, 17))
    ]
    off = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 12)]
    return model, on + off


def drop_even_drafts(monkeypatch) -> None:
    """Make the MTP head's argmax drop out wherever it is even (the next best drafts instead):
    about half the drafts rejected. A function of the MTP forward's inputs, so every engine
    drafts the same token at the same position."""
    real = ModelRunner._forward_mtp

    def forward_mtp(self, *args, **kw):
        logits, hidden = real(self, *args, **kw)
        top = logits.argmax(-1, keepdim=True)
        return torch.where(top % 2 == 0, logits.scatter(-1, top, -1e9), logits), hidden

    monkeypatch.setattr(ModelRunner, "_forward_mtp", forward_mtp)


def run_to_end(engine, prompts, params) -> dict[str, tuple[list[int], str | None, object]]:
    """Every request to its end: (output ids, finish reason, stop reason) by request id, in
    prompt order."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = (o.output_token_ids, o.finish_reason, o.stop_reason)
    assert set(final) == set(ids)
    return {r: final[r] for r in ids}


def prefill_exports(engine, prompts: list[list[int]]) -> list:
    """Prefill each prompt on `engine` (a prefill replica's role: one greedy token, the prompt's
    KV rows exported from position 0); their final RequestOutputs in prompt order."""
    finals = {}
    for i, p in enumerate(prompts):
        engine.add_request(
            p, SamplingParams(temperature=0, max_tokens=1), f"p{i}", export_kv_from=0
        )
        while engine.has_unfinished():
            finals.update({o.request_id: o for o in engine.step() if o.finished})
    return [finals[f"p{i}"] for i in range(len(prompts))]
