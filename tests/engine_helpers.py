"""Engine test helpers shared by the CPU and GPU tests."""

from moeray.platform.engine.sampler import SamplingParams


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
