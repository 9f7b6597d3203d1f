"""Console sessions: an API token exchanged for a random session id kept in this process's memory.

The cookie carries only the session id (``HttpOnly; SameSite=Strict; Path=/ui``, ``Secure`` over
HTTPS). The session remembers the token's digest, not the token, and every request re-reads the
token's identity from the registry, so revoking a token (or changing its role) applies to its
sessions at once. Each session has its own CSRF token that every state-changing form must echo.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "ef_session"
LOGIN_COOKIE = "ef_login"
MAX_SESSIONS = 1000


@dataclass
class Session:
    sid: str
    digest: str
    csrf: str
    created: float
    last_used: float
    actor: str = ""
    role: str = ""
    flash: str = ""
    flash_error: bool = False


class Sessions:
    def __init__(self, *, ttl_s: float = 8 * 3600.0, idle_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.idle_s, self.clock = ttl_s, idle_s, clock
        self._lock = threading.Lock()
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def create(self, digest: str) -> Session:
        now = self.clock()
        s = Session(secrets.token_urlsafe(32), digest, secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._by_id[s.sid] = s
            while len(self._by_id) > MAX_SESSIONS:  # the oldest are logged out first
                self._by_id.popitem(last=False)
        return s

    def get(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 100:
            return None
        now = self.clock()
        with self._lock:
            s = self._by_id.get(sid)
            if s is None:
                return None
            if now - s.created > self.ttl_s or now - s.last_used > self.idle_s:
                del self._by_id[sid]
                return None
            s.last_used = now
            self._by_id.move_to_end(sid)
            return s

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)

    def __len__(self) -> int:
        return len(self._by_id)


def same(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two CSRF tokens (both must be present)."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())
