"""The agent side's exception tree (the shared protocol raises these too).

    EdgeError
    ├── ProtocolError                  bytes on the wire are not what the contract says
    │   ├── MessageTooLargeError           capped before parsing
    │   ├── MalformedMessageError          not decodable / missing or mistyped field
    │   ├── UnsupportedVersionError        unknown major schema or envelope version
    │   └── TopicError                     topic outside the edgefleet tree
    ├── SecurityError                  the envelope refused something (never yields plaintext)
    │   ├── SignatureError                 bad signature or unknown signing key
    │   ├── WrongRecipientError            manifest/command addressed to another device
    │   ├── ExpiredError                   past expires_at
    │   ├── ReplayError                    sequence number not newer than the last accepted
    │   ├── DowngradeError                 version older than the committed one, no signed rollback
    │   ├── KeyUnwrapError                 wrapped data key does not open with this device's key
    │   ├── DecryptionError                a chunk failed AES-GCM authentication
    │   └── IntegrityError                 digest or size mismatch after decryption
    ├── TransferError                  reassembly rules broken
    │   ├── ArtifactTooLargeError          declared or received size over the cap
    │   ├── ConflictingChunkError          same index, different bytes
    │   └── ChunkOutOfRangeError           index >= chunk count, or wrong chunk length
    ├── LifecycleError                 illegal transition in a state machine
    ├── ModelError                     a model could not be served
    │   ├── ModelLoadError                 runtime refused to load it
    │   ├── HealthCheckError               warm-up / health check failed (carries the reason)
    │   ├── ModelNotReadyError             nothing is being served yet (HTTP 503)
    │   ├── ModelNotFoundError             asked for a model name/version that is not being served (HTTP 404)
    │   └── InferenceError                 a request failed inside the runtime
    │       └── InvalidInputError              the request's tensors do not fit the model (HTTP 400)
    ├── StorageError                   disk-side failure (full disk, missing version, corrupt journal)
    │   ├── DiskFullError                  no space (ENOSPC/EDQUOT) or under the configured free-space floor
    │   └── VersionNotKeptError            rollback target is not in the local store
    ├── ConfigError                    invalid configuration, with the offending field
    └── TransportError                 MQTT-side failure (carries paho's reason code)

Every class carries the data needed to report it as an event: ``code`` is a short
stable identifier used in events and metrics; subclasses add typed fields.
Foreign exceptions (cryptography's InvalidTag, json errors, paho rc codes) are
translated at the seam with ``raise ... from``.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error the agent (and the shared protocol) raises on purpose."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# -- protocol -----------------------------------------------------------------------------------


class ProtocolError(EdgeError):
    code = "protocol"


class MessageTooLargeError(ProtocolError, ValueError):
    code = "message_too_large"

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} is {size} bytes, over the {limit}-byte limit")
        self.what = what
        self.size = size
        self.limit = limit


class MalformedMessageError(ProtocolError, ValueError):
    code = "malformed"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnsupportedVersionError(ProtocolError):
    code = "unsupported_version"

    def __init__(self, what: str, version: str, supported: str) -> None:
        super().__init__(f"{what} version {version} is not supported (this build speaks {supported})")
        self.what = what
        self.version = version
        self.supported = supported


class TopicError(ProtocolError, ValueError):
    code = "bad_topic"


# -- security envelope --------------------------------------------------------------------------


class SecurityError(EdgeError):
    code = "security"


class SignatureError(SecurityError):
    code = "bad_signature"


class WrongRecipientError(SecurityError):
    code = "wrong_recipient"

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"addressed to device {got!r}, this is {expected!r}")
        self.expected = expected
        self.got = got


class ExpiredError(SecurityError):
    code = "expired"

    def __init__(self, expires_at: float, now: float) -> None:
        super().__init__(f"expired at {expires_at:.0f}, now {now:.0f}")
        self.expires_at = expires_at
        self.now = now


class ReplayError(SecurityError):
    code = "replay"

    def __init__(self, seq: int, last_seq: int) -> None:
        super().__init__(f"sequence {seq} is not newer than the last accepted {last_seq}")
        self.seq = seq
        self.last_seq = last_seq


class DowngradeError(SecurityError):
    code = "downgrade"

    def __init__(self, model: str, version: int, committed: int) -> None:
        super().__init__(
            f"{model} version {version} is older than committed version {committed}; only a signed rollback may go back"
        )
        self.model = model
        self.version = version
        self.committed = committed


class KeyUnwrapError(SecurityError):
    code = "key_unwrap"


class DecryptionError(SecurityError):
    code = "decrypt"

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class IntegrityError(SecurityError):
    code = "integrity"


# -- transfer / reassembly ----------------------------------------------------------------------


class TransferError(EdgeError):
    code = "transfer"


class ArtifactTooLargeError(TransferError, ValueError):
    code = "artifact_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"artifact of {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit


class ConflictingChunkError(TransferError):
    code = "conflicting_chunk"

    def __init__(self, index: int) -> None:
        super().__init__(f"chunk {index} arrived twice with different contents")
        self.index = index


class ChunkOutOfRangeError(TransferError, ValueError):
    code = "chunk_out_of_range"

    def __init__(self, message: str, *, index: int) -> None:
        super().__init__(message)
        self.index = index


# -- lifecycle / models / storage ---------------------------------------------------------------


class LifecycleError(EdgeError):
    code = "illegal_transition"

    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"event {event!r} is not allowed in state {state!r}")
        self.state = state
        self.event = event


class ModelError(EdgeError):
    code = "model"


class ModelLoadError(ModelError):
    code = "model_load"


class MemoryBudgetError(ModelError):
    """A candidate would not fit the device's RAM budget for models; the committed model keeps serving."""

    code = "memory_budget"

    def __init__(self, needed: int, budget: int, what: str) -> None:
        super().__init__(f"{what} needs {needed} bytes of RAM, over the {budget}-byte model memory budget")
        self.needed = needed
        self.budget = budget


class HealthCheckError(ModelError):
    code = "health_check"

    def __init__(self, reason: str, *, check: str) -> None:
        super().__init__(f"health check {check!r} failed: {reason}")
        self.reason = reason
        self.check = check


class InferenceError(ModelError):
    code = "inference"


class InvalidInputError(InferenceError, ValueError):
    """The caller's tensors do not fit the model (missing, unknown, wrong dtype or shape): never the model's fault."""

    code = "invalid_input"

    def __init__(self, message: str, *, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


class ModelNotReadyError(ModelError):
    code = "model_not_ready"


class ModelNotFoundError(ModelError):
    code = "model_not_found"

    def __init__(self, message: str, *, name: str, version: int | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.version = version


class StorageError(EdgeError):
    code = "storage"


class DiskFullError(StorageError):
    code = "disk_full"


class VersionNotKeptError(StorageError):
    code = "version_not_kept"

    def __init__(self, model: str, version: int | None) -> None:
        what = f"version {version}" if version is not None else "a previous version"
        super().__init__(f"{model}: {what} is not kept on this device")
        self.model = model
        self.version = version


class ConfigError(EdgeError, ValueError):
    code = "config"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TransportError(EdgeError):
    code = "transport"

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code
