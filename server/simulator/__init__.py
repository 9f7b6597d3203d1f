"""A fleet simulator: many devices running the agent's protocol and lifecycle code over real MQTT.

See docs/simulator.md. ``SimFleet`` (fleet.py) runs the devices on a few threads; ``SimDevice``
(device.py) is one device; ``StreamingSink`` (sink.py) checks an artifact without keeping it.
"""

from server.simulator.device import SIM_AGENT_VERSION, SimDevice, SimSettings, SimShared
from server.simulator.fleet import BrokerTarget, FleetSnapshot, SimFleet, device_ids, device_key

__all__ = [
    "SIM_AGENT_VERSION",
    "BrokerTarget",
    "FleetSnapshot",
    "SimDevice",
    "SimFleet",
    "SimSettings",
    "SimShared",
    "device_ids",
    "device_key",
]
