"""The node's HTTP API: OpenAI schemas, the FastAPI app, and the bridge to the engine process.

Layers, one module each: `schemas` (request models and their validation), `tokenization` (chat
template and tokenizer, off the event loop), `backend` (`NodeBackend`: where a tokenized request
goes; the colocated one wraps `EngineClient`), `serving` (one OpenAI request -> engine requests ->
responses), `formatting` (response bodies and stream chunks), `app` (routes, errors, guards),
`metrics`, `config` and `cli`. Nothing here runs the model; `engine` is reached only through
`pd_serve.engine.client` and its messages.
"""
