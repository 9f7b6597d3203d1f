"""Sans-IO core: state machines that take bytes/events (and ``now``) and return decisions.

Nothing here imports paho, sockets, threads, onnxruntime or reads the clock.
"""
