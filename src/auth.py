"""API keys and ownership.

Keys come from `TINK_API_KEYS` (comma-separated), `TINK_API_KEYS_FILE` (one key per line,
`#` comments) and `TINK_ADMIN_KEYS`. A key is never stored or logged: what the worker keeps
is its fingerprint (`owner`), and everything a request creates (models, their checkpoints,
futures, sampling sessions) is recorded under it. Another key gets 404 for those ids, as if
they did not exist, so ids cannot be probed; an admin key sees everything. A checkpoint its
owner published is readable (sample, load, download) by every key, and still changed
(deleted, published, given a TTL) only by its owner.
With no keys configured, every caller is the same anonymous owner (single-user use).
A request carries its key in `X-API-Key` or, as OpenAI clients send it, `Authorization: Bearer <key>`.

Download links carry their own authority instead of a key: `UrlSigner` signs the link's path
and expiry with a server secret (HMAC-SHA256), so a link can be neither altered nor extended.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ANONYMOUS = "anonymous"
_UNIX_TIME = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class Caller:
    owner: str
    admin: bool = False

    def may_see(self, owner: str | None) -> bool:
        """May read and change what `owner` created."""
        return self.admin or owner == self.owner

    def may_read(self, owner: str | None, public: bool) -> bool:
        """May read (sample from, load, download) a checkpoint of `owner`'s, published or not."""
        return public or self.may_see(owner)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: `X-API-Key` (the Tinker SDK's header) or `Authorization: Bearer <key>`
    (what OpenAI clients send); X-API-Key wins when both are there."""
    if headers.get("X-API-Key"):
        return headers["X-API-Key"]
    scheme, _, token = (headers.get("Authorization") or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


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


class UrlSigner:
    """Signs and checks links that work without an API key until they expire.

        >>> signer = UrlSigner(b"server secret")
        >>> expires = int(time.time()) + 900
        >>> sig = signer.sign("/api/v1/checkpoint_files/run/external_weights/x/adapter_config.json", expires)
        >>> signer.refusal("/api/v1/checkpoint_files/run/external_weights/x/adapter_config.json", expires, sig)
        # None: valid. Any other path, a later expiry or a changed signature gives the reason it is refused.
    """

    def __init__(self, secret: bytes | None = None):
        # No configured secret: a random one, so links die with the process (they are short-lived anyway).
        self._secret = secret or secrets.token_bytes(32)

    def sign(self, resource: str, expires: int) -> str:
        return hmac.new(self._secret, f"{resource}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def refusal(self, resource: str, expires: str | None, signature: str | None,
                now: float | None = None) -> str | None:
        """Why a link to `resource` with these query values must be refused, or None if it is valid."""
        if not isinstance(expires, str) or not _UNIX_TIME.fullmatch(expires) or not isinstance(signature, str):
            return "the link has no valid expires/signature parameters; ask for a new one"
        expected = self.sign(resource, int(expires))
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            return "the link's signature does not match (altered, or signed by another server); ask for a new one"
        if int(expires) <= (time.time() if now is None else now):
            return "the link has expired; ask for a new one (external_weights_urls)"
        return None
