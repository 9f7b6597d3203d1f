"""Devices for tests: a real agent process (``agent_process``) and its pytest fixtures (``fixtures``)."""
