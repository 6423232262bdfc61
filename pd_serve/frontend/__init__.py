"""The frontend: the one address clients use. It pairs each request with a prefill and a decode node
and relays the decode node's answer; it never runs a model or a tokenizer. `up` launches a local cluster.

Modules: `app` (the ASGI app: routes, auth, admission) and `admin` (health, models, cache flush);
`proxy` (`Relay`: one request, its attempts and retries) with `answers` (what a node answered),
`failures` (a lost attempt and whom it blames), `downstream` (sending to the client), `upstream` and
`node_pool` (requests to the nodes); `router`, `policies`, `nodes`, `breaker` and `load` (pairing);
`limits` and `errors` (the request's checks, the frontend's own errors); `up` and `cluster` (the local
cluster command and its children).
"""
