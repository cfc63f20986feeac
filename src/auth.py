"""API keys and ownership.

Keys come from `TINK_API_KEYS` (comma-separated), `TINK_API_KEYS_FILE` (one key per line,
`#` comments) and `TINK_ADMIN_KEYS`. A key is never stored or logged: what the worker keeps
is its fingerprint (`owner`), and everything a request creates (models, their checkpoints,
futures, sampling sessions) is recorded under it. Another key gets 404 for those ids, as if
they did not exist, so ids cannot be probed; an admin key sees everything.
With no keys configured, every caller is the same anonymous owner (single-user use).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Caller:
    owner: str
    admin: bool = False

    def may_see(self, owner: str | None) -> bool:
        return self.admin or owner == self.owner


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def read_keys_file(path: Path) -> tuple[str, ...]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return tuple(line for line in lines if line)


class KeyRing:
    def __init__(self, user_keys: tuple[str, ...], admin_keys: tuple[str, ...]):
        self._keys = [(k.encode(), fingerprint(k), False) for k in user_keys]
        self._keys += [(k.encode(), fingerprint(k), True) for k in admin_keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, given: str | None) -> Caller | None:
        """The caller for `given`, or None. Compares with every key in constant time."""
        if not self._keys:
            return Caller(ANONYMOUS, admin=True)
        raw = (given or "").encode()
        found: Caller | None = None
        for key, owner, admin in self._keys:
            if hmac.compare_digest(raw, key):  # no early exit: timing says nothing about which matched
                found = Caller(owner, admin)
        return found
