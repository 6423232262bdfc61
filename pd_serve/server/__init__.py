"""The node's HTTP API: OpenAI schemas, the FastAPI app, and the bridge to the engine process.

Layers, one module each: `schemas` (request models and their validation), `tokenization` (chat
template and tokenizer, off the event loop), `backend` (`NodeBackend`: where a tokenized request
goes; the colocated one wraps `EngineClient`; `roles` the prefill and decode ones), `serving` (one
OpenAI request -> engine requests -> responses) with its steps `planning` (engine requests and their
400s), `streams` (the engine streams) and `hangup` (a client that leaves), `formatting` (response
bodies and stream chunks), `app` (routes, lifespan, errors, guards), `admin` (health, metrics, server
info, profiler), `metrics`, `config` and `cli`. Nothing here runs the model; `engine` is reached only through
`pd_serve.engine.client` and its messages.
"""
