"""The frontend: the one address clients use. It pairs each request with a prefill and a decode node
and relays the decode node's answer; it never runs a model or a tokenizer. `up` launches a local cluster.
"""
