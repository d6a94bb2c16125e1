"""Engine test helpers shared by the CPU and GPU tests."""

from moeray.platform.engine.sampler import SamplingParams


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
