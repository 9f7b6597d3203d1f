"""edgefleet server: compression pipeline, registry, rollout engine, publisher, operator CLI.

Imports ``agent.protocol`` for the shared contract; the agent never imports this package.
"""

from agent import __version__

__all__ = ["__version__"]
