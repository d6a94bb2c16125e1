"""The OpenAI-compatible HTTP API, engine-agnostic.

protocol.py   what the server needs from the serving side: GenerationBackend, Tokenizer,
              GenerationRequest / GenerationStep, BackendOverloaded
schemas.py    request and response bodies (pydantic), OpenAI's limits
errors.py     OpenAI-shaped errors (APIError, the 400 of a validation error, the 429)
auth.py       the API key and the bearer check
admission.py  AdmissionGate: at most max_in_flight choices, else 429
text.py       incremental detokenization and stop strings
chat.py       the default chat template
responses.py  choice events to response objects and stream chunks
sse.py        server-sent events
middleware.py the request id on every response, the body-size limit (413)
server.py     OpenAIServer: the request handling behind the routes
app.py        build_app: the FastAPI app
"""
