"""Servers for tests: the real server in-process (``fleet``) or as a process (``process``, ``faulty``,
with ``main`` as its entry point), and a small stand-in for agent tests (``stub``)."""
