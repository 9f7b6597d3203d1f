"""What the device trusts about the server's signed messages: one object owns it.

Theory of operation
    ``TrustState`` is to the agent what python-tuf's ``TrustedMetadataSet`` is to its client: it
    takes bytes, never touches disk or network, and owns every rule that says whether a signed
    message may be believed *now*:

      * the replay floor: the journal's ``last_seq`` is the floor the lifecycle keeps; this object
        keeps what the ``seq.floor`` backup on disk says (``persisted_floor``), says when it must be
        rewritten (only when the floor moves), and rebuilds the floor after a lost journal from every
        record that vouches for it (``recover``);
      * expiry: the expiry of the last accepted desired state, and whether its lapse was reported
        (freeze detection, once per desired state);
      * the downgrade floor: a ``deploy`` older than the committed version of its model is refused
        after the message is known to be authentic (so the refusal uses up its seq);
      * ignored blobs: digests of desired states already refused (a retained message re-delivered on
        every reconnect is not verified and reported again).

    The shell (agent.runtime, server.simulator) does the I/O: it reads and writes ``seq.floor``
    and the last accepted desired state, and reports what this object decides.
"""

from __future__ import annotations

from collections import deque

from agent.core.journal import JournalRecord, recover_replay_floor
from agent.errors import DowngradeError, EdgeError, ExpiredError, WrongRecipientError
from agent.protocol.envelope import DEFAULT_CLOCK_SKEW_S, TrustAnchor, open_command, open_desired, verify_payload
from agent.protocol.messages import Command, DesiredState, decode_payload

MAX_IGNORED_BLOBS = 64


class TrustState:
    """The trust rules for one device's signed messages (see the module docstring)."""

    def __init__(
        self,
        anchor: TrustAnchor,
        *,
        device_id: str,
        skew: float = DEFAULT_CLOCK_SKEW_S,
        max_ignored: int = MAX_IGNORED_BLOBS,
    ) -> None:
        self.anchor = anchor
        self.device_id = device_id
        self.skew = skew
        #: what the ``seq.floor`` backup holds on disk
        self.persisted_floor = 0
        #: the expiry of the last accepted desired state
        self.desired_expires_at: float | None = None
        self._expiry_reported = False
        self._ignored: deque[str] = deque(maxlen=max_ignored)

    # -- the replay floor --------------------------------------------------------------------------

    def recover(self, record: JournalRecord, *, on_disk: int | None, last_desired: bytes | None) -> JournalRecord:
        """The journal record with its replay floor raised to what ``seq.floor`` and the last desired vouch for."""
        self.persisted_floor = on_disk or 0
        return recover_replay_floor(record, on_disk, self._note_last_desired(last_desired))

    def floor_moves(self, seq: int) -> bool:
        """Whether ``seq.floor`` must be rewritten for ``seq`` (only when the floor moves: rare)."""
        return seq > self.persisted_floor

    def floor_saved(self, seq: int) -> None:
        self.persisted_floor = seq

    def _note_last_desired(self, blob: bytes | None) -> int | None:
        """Note the expiry of the last accepted desired state; returns its seq (a floor for replays)."""
        if blob is None:
            return None
        try:
            desired = decode_payload(verify_payload(blob, "desired", self.anchor), "desired")
        except EdgeError:
            return None
        assert isinstance(desired, DesiredState)
        self.desired_expires_at = desired.expires_at
        return desired.seq

    # -- expiry --------------------------------------------------------------------------------------

    def accepted(self, desired: DesiredState) -> None:
        """A desired state was accepted: its expiry is the one watched from now on."""
        self.desired_expires_at = desired.expires_at
        self._expiry_reported = False

    def expiry_due(self, now: float) -> float | None:
        """The expiry to report as lapsed (freeze detection), once per desired state; else None."""
        expires = self.desired_expires_at
        if expires is None or self._expiry_reported or now <= expires:
            return None
        self._expiry_reported = True
        return expires

    def check_fresh(self, desired: DesiredState, now: float) -> None:
        """A stored desired state is still addressed to this device and unexpired (its seq was accepted)."""
        if desired.device_id != self.device_id:
            raise WrongRecipientError(self.device_id, desired.device_id)
        if now > desired.expires_at + self.skew:
            raise ExpiredError(desired.expires_at, now)

    def reopen(self, blob: bytes, now: float) -> DesiredState:
        """Check a stored desired state again (signature, recipient, expiry); its seq was accepted already."""
        desired = decode_payload(verify_payload(blob, "desired", self.anchor), "desired")
        assert isinstance(desired, DesiredState)
        self.check_fresh(desired, now)
        return desired

    # -- messages ------------------------------------------------------------------------------------

    def known(self, digest: str, record: JournalRecord) -> bool:
        """The desired state last accepted, or one already refused (re-delivered on reconnect)."""
        return digest == record.last_desired_sha256 or digest in self._ignored

    def open_desired(self, blob: bytes, digest: str, record: JournalRecord, now: float) -> DesiredState:
        """Verify a desired state (signature, recipient, freshness, replay); a refused one is ignored from now on.

        The downgrade floor is not checked here: see ``downgrade``, which needs the authentic message.
        """
        try:
            return open_desired(
                blob,
                trust=self.anchor,
                device_id=self.device_id,
                now=now,
                last_seq=record.last_seq,
                committed_version=lambda _name: None,  # ``downgrade`` checks it once the message is authentic
                skew=self.skew,
            )
        except EdgeError:
            self._ignored.append(digest)
            raise

    def open_command(self, blob: bytes, record: JournalRecord, now: float) -> Command:
        """Verify a command (signature, recipient, freshness, replay); raises EdgeError."""
        return open_command(blob, trust=self.anchor, device_id=self.device_id, now=now, last_seq=record.last_seq,
                            skew=self.skew)

    @staticmethod
    def downgrade(desired: DesiredState, record: JournalRecord) -> DowngradeError | None:
        """A ``deploy`` older than the committed version of its model; a ``pin`` may go backwards."""
        if desired.action != "deploy":
            return None
        model = desired.model
        floor = record.committed_version(model.name)
        if floor is not None and model.version < floor:
            return DowngradeError(model.name, model.version, floor)
        return None


__all__ = ["MAX_IGNORED_BLOBS", "TrustState"]
