"""The server side's exception tree.

    ServerError
    ├── ProfileError            a firmware profile is missing or invalid (names the file and field)
    ├── ModelError              a model file is unreadable or invalid, or unsupported by a profile
    │   └── UnsupportedOpError      an op/opset the profile's runtime lacks (names op and profile)
    ├── DatasetError            calibration/evaluation data missing or of the wrong shape
    ├── GateError               no variant could be built at all (not even fp32)
    ├── RegistryError           registry problems
    │   ├── NotFoundError           unknown device, model, version, deployment
    │   └── ConflictError           e.g. a second concurrent deployment to the same devices
    ├── KeyStoreError           signing key missing or unreadable
    ├── ConfigError             invalid server.toml (names section and key)
    ├── InvalidRequestError     an operator request that cannot be carried out as asked
    │   └── PayloadTooLargeError    a request body over ``[api] max_body_bytes``
    ├── AuthError               missing or unknown API token
    │   └── ForbiddenError          a valid token whose role does not cover the route
    └── PublishError            the broker refused or dropped a publish

Errors that cross into the agent contract (bad signatures, malformed messages) are
``agent.errors`` types: the server raises and catches those as they are.
"""

from __future__ import annotations


class ServerError(Exception):
    code = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProfileError(ServerError, ValueError):
    code = "profile"

    def __init__(self, message: str, *, profile: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.profile = profile
        self.field = field


class ModelError(ServerError):
    code = "model"


class UnsupportedOpError(ModelError):
    code = "unsupported_op"

    def __init__(self, message: str, *, op: str | None = None, profile: str | None = None) -> None:
        super().__init__(message)
        self.op = op
        self.profile = profile


class DatasetError(ServerError, ValueError):
    code = "dataset"


class GateError(ServerError):
    code = "gate"


class RegistryError(ServerError):
    code = "registry"


class NotFoundError(RegistryError, LookupError):
    code = "not_found"


class ConflictError(RegistryError):
    code = "conflict"


class KeyStoreError(ServerError):
    code = "keys"


class PublishError(ServerError):
    code = "publish"

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class ConfigError(ServerError, ValueError):
    """Invalid server configuration; ``field`` is "section.key"."""

    code = "config"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidRequestError(ServerError, ValueError):
    """An operator request that cannot be carried out as asked (bad target, bad percentage, ...)."""

    code = "invalid"


class PayloadTooLargeError(InvalidRequestError):
    """A request body over the API's cap (refused before it is read)."""

    code = "too_large"


class AuthError(ServerError):
    """Missing or unknown API token; ``actor`` is who the audit log names (the token's owner when known)."""

    code = "unauthorized"

    def __init__(self, message: str, *, actor: str = "anonymous") -> None:
        super().__init__(message)
        self.actor = actor


class ForbiddenError(AuthError):
    """A known API token whose role does not allow the call."""

    code = "forbidden"
