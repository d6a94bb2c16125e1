"""A request body's sampling fields -> the `GenerationParams` of each of its choices.

Fields a request leaves unset take the model's generation_config.json values
(`SamplingDefaults`), then the API's defaults. A value GenerationParams refuses (min_tokens above
max_tokens, say) is a 400 naming that field.
"""

from __future__ import annotations

import dataclasses

from moeray.platform.engine.structured import StructuredOutput
from moeray.platform.serve.http.errors import APIError
from moeray.platform.serve.http.protocol import GenerationParams, SamplingDefaults
from moeray.platform.serve.http.schemas import ChatCompletionRequest, CompletionRequest


def _param_of(error: ValueError) -> str | None:
    """GenerationParams' messages start with `name=value`: the field to name in the 400."""
    name = str(error).split("=", 1)[0]
    return name if name in {f.name for f in dataclasses.fields(GenerationParams)} else None


def completion_max_tokens(body: CompletionRequest) -> int | None:
    """The completion's max_tokens for the engine. As vLLM: 0 with echo returns the scored prompt
    alone (the engine generates one token, which is dropped); without echo it is a 400."""
    if body.max_tokens != 0:
        return body.max_tokens
    if not body.echo:
        raise APIError(
            400,
            "max_tokens=0 is accepted only with echo=true (the prompt alone, scored with "
            "logprobs); otherwise max_tokens must be >= 1",
            param="max_tokens",
            code="invalid_value",
        )
    return 1


def generation_params(
    body: CompletionRequest | ChatCompletionRequest,
    defaults: SamplingDefaults,
    max_tokens: int,
    logprobs: int | None,
    *,
    prompt_logprobs: int | None = None,
    structured: StructuredOutput | None = None,
) -> GenerationParams:
    """The choices' params: max_tokens as fitted to the context, logprobs as the engine should
    compute them (the server may drop them from the response)."""
    given = body.model_fields_set
    temperature = body.temperature
    if "temperature" not in given and defaults.temperature is not None:
        temperature = defaults.temperature
    top_p = body.top_p
    if "top_p" not in given and defaults.top_p is not None:
        top_p = defaults.top_p
    top_k = body.top_k if body.top_k is not None else (defaults.top_k or 0)
    min_p = body.min_p if body.min_p is not None else (defaults.min_p or 0.0)
    rep = body.repetition_penalty
    if rep is None:
        rep = defaults.repetition_penalty if defaults.repetition_penalty is not None else 1.0
    try:
        return GenerationParams(
            max_tokens,
            temperature,
            top_p,
            body.seed,
            body.stop,
            logprobs,
            body.ignore_eos,
            top_k=max(top_k, 0),  # vLLM's -1 is off, as 0 is
            min_p=min_p,
            min_tokens=body.min_tokens,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            repetition_penalty=rep,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias=body.logit_bias,
            prompt_logprobs=prompt_logprobs,
            structured=structured,
        )
    except ValueError as e:
        raise APIError(400, str(e), param=_param_of(e), code="invalid_value") from None
