"""The bootstrap rendezvous service (`pd-serve bootstrap`) and its client.

Modules: `records` (the wire types), `store` (the store interface) with `memory_store` and
`redis_store`, `app` (the HTTP API, documented there) with `registry`, `middleware` and `metrics`, `client`
(what nodes and the frontend use, with its `errors`), `process` (running the service and a Redis as
child processes), `config` and `cli`. This package imports nothing else from pd_serve; importing it
loads nothing heavy.
"""
