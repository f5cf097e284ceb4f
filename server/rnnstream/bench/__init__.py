"""Benchmarks of a running server and of the ceilings it is measured against.

loadgen drives a server with closed-loop sessions, one token per request.
transport is a servicer that replies without a model or store, for the gRPC
ceiling. ceilings times the model in-process, Redis round trips and prefill.
report summarises latencies and prints tables; command wires it all to
`rnnstream bench`.
"""

MODES = ("step", "stream")  # one Step call per token, or one StreamSession message per token
