"""Who may be a device: one rule for registration, enrolment, approval and the broker config.

A device id is its MQTT username (the generated ACL and ``use_username_as_clientid`` key
everything on it), so an id that equals a server login would hand its holder the server's
broker rights. Reserved, case-insensitively: the server's own broker user, every name that
starts with it (room for one login per server process), and the ``[broker] username`` a
server config names. Anything that is not a valid device id (``agent.protocol.topics``) is
refused before that.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.errors import TopicError
from agent.protocol.topics import validate_device_id
from server.errors import InvalidRequestError

#: The server's broker login in every config ``edgefleet broker config`` writes.
SERVER_USER = "edgefleet-server"


def server_logins(configured: str = "") -> frozenset[str]:
    """The broker logins no device may take: the server's user and the one a config names."""
    return frozenset({SERVER_USER, *([configured] if configured else [])})


def device_id_problem(device_id: object, reserved: Iterable[str] = ()) -> str | None:
    """Why ``device_id`` cannot be a device (None when it can)."""
    if not isinstance(device_id, str):
        return f"invalid device id {device_id!r}: not a string"
    try:
        validate_device_id(device_id)
    except TopicError as exc:
        return exc.message
    folded = device_id.casefold()
    names = {SERVER_USER, *reserved}
    if folded.startswith(SERVER_USER) or folded in {n.casefold() for n in names}:
        return (f"device id {device_id!r} is reserved: it is (or starts like) the server's broker login "
                f"{SERVER_USER!r}; pick another id")
    return None


def check_device_id(device_id: str, reserved: Iterable[str] = ()) -> str:
    """``device_id`` if a device may have it, else InvalidRequestError saying why."""
    problem = device_id_problem(device_id, reserved)
    if problem is not None:
        raise InvalidRequestError(problem)
    return device_id


def refuse_reserved_logins(device_logins: Iterable[str], configured: str = "") -> None:
    """The broker config's last gate: no device login may collide with a server login (InvalidRequestError)."""
    reserved = server_logins(configured)
    bad = sorted(d for d in device_logins if device_id_problem(d, reserved) is not None)
    if bad:
        raise InvalidRequestError(
            f"refusing to write the broker config: device login(s) {', '.join(repr(b) for b in bad[:10])} "
            f"collide with the server's broker login ({', '.join(sorted(reserved))}) or are not valid device ids; "
            "revoke them (`edgefleet devices revoke ID`) and register the devices under other ids"
        )
