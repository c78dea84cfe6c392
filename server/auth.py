"""Who may call the cloud: per-edge credentials, checked on every RPC. One job.

The credentials file (TOML; ``fedshift creds add|revoke FILE EDGE`` writes it) names each edge:

    [edges.e0]
    salt = "9f2c…"            # hex, per edge
    token_sha256 = "5d1a…"    # hex sha256(salt ‖ token); the token itself is never stored
    cert_cn = "e0"            # optional: its client certificate's common name (mutual TLS)
    revoked = false

Tokens are 32 random bytes (``fedshift creds add`` makes them), so one salted sha256 suffices: a
slow password hash protects guessable secrets, and these are not guessable.

The rules of :meth:`Authenticator.check`, in order:

1. No credentials file: the legacy shared token (``--token``), when set, must match
   (UNAUTHENTICATED otherwise); with neither, every caller is let in (the cloud says so at start).
2. The caller is identified by its client certificate's common name when mutual TLS gives one
   and an entry names it (``cert_cn``), else by its token: the claimed edge's entry first, then
   (to tell a stolen id from a stranger) every other entry.
3. Identified by nothing → UNAUTHENTICATED ("unknown edge or wrong credential").
4. Identified as a revoked edge → PERMISSION_DENIED.
5. Identified as edge X while claiming edge Y → PERMISSION_DENIED.

The file is re-read when its modification time or size changes (looked at, at most, every
``reload_interval_s``), so adding or revoking an edge needs no restart; a file that no longer
parses keeps the previous credentials in force and says why in the log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import grpc

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger(__name__)


class AuthError(Exception):
    """A refused call: the gRPC status code and a message that says what was wrong."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class EdgeCredential:
    """One edge's entry of the credentials file."""

    edge_id: str
    salt: bytes = b""
    token_sha256: bytes = b""
    cert_cn: str = ""
    revoked: bool = False

    def token_matches(self, token: str) -> bool:
        if not self.token_sha256 or not token:
            return False
        return hmac.compare_digest(token_hash(self.salt, token), self.token_sha256)


def token_hash(salt: bytes, token: str) -> bytes:
    return hashlib.sha256(salt + token.encode()).digest()


def parse_credentials(text: str, where: str = "credentials") -> dict[str, EdgeCredential]:
    """The ``[edges.<id>]`` tables of a credentials file; unknown keys and bad values refused."""
    data = tomllib.loads(text)
    unknown = set(data) - {"edges"}
    if unknown:
        raise ValueError(f"{where}: unknown top-level keys {sorted(unknown)} (expected [edges.<id>] tables)")
    out: dict[str, EdgeCredential] = {}
    for edge_id, entry in (data.get("edges") or {}).items():
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: edges.{edge_id} must be a table")
        extra = set(entry) - {"salt", "token_sha256", "cert_cn", "revoked"}
        if extra:
            raise ValueError(f"{where}: edges.{edge_id}: unknown keys {sorted(extra)}")
        try:
            salt, digest = bytes.fromhex(entry.get("salt", "")), bytes.fromhex(entry.get("token_sha256", ""))
        except ValueError as exc:
            raise ValueError(f"{where}: edges.{edge_id}: salt / token_sha256 must be hex") from exc
        if digest and len(digest) != 32:
            raise ValueError(f"{where}: edges.{edge_id}: token_sha256 must be 32 bytes of hex")
        cert_cn, revoked = entry.get("cert_cn", ""), entry.get("revoked", False)
        if not isinstance(cert_cn, str) or not isinstance(revoked, bool):
            raise ValueError(f"{where}: edges.{edge_id}: cert_cn must be a string and revoked a boolean")
        if not digest and not cert_cn:
            raise ValueError(f"{where}: edges.{edge_id} has neither a token hash nor a certificate name")
        out[edge_id] = EdgeCredential(edge_id, salt, digest, cert_cn, revoked)
    return out


def format_credentials(entries: Mapping[str, EdgeCredential]) -> str:
    """The TOML text :func:`parse_credentials` reads back."""
    lines = ["# fedshift edge credentials: `fedshift creds add|revoke` edits this file; the cloud re-reads it",
             "# when it changes. Tokens are not stored, only salted sha256 hashes.", ""]
    for edge_id in sorted(entries):
        e = entries[edge_id]
        lines += [f'[edges."{edge_id}"]', f'salt = "{e.salt.hex()}"', f'token_sha256 = "{e.token_sha256.hex()}"',
                  f'cert_cn = "{e.cert_cn}"', f"revoked = {'true' if e.revoked else 'false'}", ""]
    return "\n".join(lines)


def add_edge(path: str | os.PathLike, edge_id: str, cert_cn: str = "") -> str:
    """Add (or re-key) ``edge_id`` in the credentials file; return its new token (shown once)."""
    if not edge_id or any(c in edge_id for c in '"\\\n'):
        raise ValueError(f"bad edge id {edge_id!r}")
    path = Path(path)
    entries = parse_credentials(path.read_text(), str(path)) if path.exists() else {}
    token = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    entries[edge_id] = EdgeCredential(edge_id, salt, token_hash(salt, token), cert_cn, False)
    _write(path, entries)
    return token


def revoke_edge(path: str | os.PathLike, edge_id: str) -> None:
    """Mark ``edge_id`` revoked (its calls get PERMISSION_DENIED once the cloud re-reads the file)."""
    path = Path(path)
    entries = parse_credentials(path.read_text(), str(path))
    if edge_id not in entries:
        raise KeyError(f"{path}: no edge {edge_id!r}")
    e = entries[edge_id]
    entries[edge_id] = EdgeCredential(e.edge_id, e.salt, e.token_sha256, e.cert_cn, True)
    _write(path, entries)


def _write(path: Path, entries: Mapping[str, EdgeCredential]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(format_credentials(entries))
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def peer_common_name(context: grpc.ServicerContext) -> str:
    """The client certificate's common name under mutual TLS ("" without one)."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else ""


class Authenticator:
    """Checks each call's (edge id, token, certificate name); see the module docstring."""

    def __init__(self, credentials: str | os.PathLike | None = None, shared_token: str = "", *,
                 reload_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(credentials) if credentials else None
        self.shared_token = shared_token
        self.reload_interval_s = reload_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, EdgeCredential] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = -float("inf")
        if self.path is not None:
            if not self.path.is_file():
                raise FileNotFoundError(f"credentials file not found: {self.path}")
            self._reload(force=True)

    @property
    def mode(self) -> str:
        """What is checked: credentials (per edge), shared-token, or none."""
        return "credentials" if self.path else "shared-token" if self.shared_token else "none"

    def known(self) -> int:
        with self._lock:
            return len(self._entries)

    def _reload(self, force: bool = False) -> None:
        assert self.path is not None
        now = self._clock()
        if not force and now - self._checked < self.reload_interval_s:
            return
        self._checked = now
        try:
            st = self.path.stat()
        except OSError as exc:
            log.error("credentials file %s unreadable (%s): keeping the %d credentials in force", self.path, exc,
                      len(self._entries))
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            entries = parse_credentials(self.path.read_text(), str(self.path))
        except (OSError, ValueError) as exc:
            if force:
                raise
            log.error("credentials file %s no longer parses (%s): keeping the %d credentials in force",
                      self.path, exc, len(self._entries))
            self._stamp = stamp
            return
        self._entries, self._stamp = entries, stamp
        log.info("credentials: %d edge(s) from %s (%d revoked)", len(entries), self.path,
                 sum(e.revoked for e in entries.values()))

    def check(self, edge_id: str, token: str, cert_cn: str = "") -> None:
        """Return if the call may proceed; raise :class:`AuthError` otherwise."""
        if self.path is None:
            if self.shared_token and not hmac.compare_digest(token.encode(), self.shared_token.encode()):
                raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")
            return
        with self._lock:
            self._reload()
            entries = self._entries
        who = self._identify(entries, edge_id, token, cert_cn)
        if who is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED,
                            "unknown edge or wrong credential" + (f" (certificate {cert_cn!r})" if cert_cn else ""))
        if who.revoked:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"edge {who.edge_id!r} is revoked")
        if who.edge_id != edge_id:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            f"the credential of edge {who.edge_id!r} cannot act as edge {edge_id!r}")

    @staticmethod
    def _identify(entries: Mapping[str, EdgeCredential], edge_id: str, token: str,
                  cert_cn: str) -> EdgeCredential | None:
        if cert_cn:  # an entry that names this certificate identifies the caller; else its token does
            for e in entries.values():
                if e.cert_cn == cert_cn:
                    return e
        claimed = entries.get(edge_id)
        if claimed is not None and claimed.token_matches(token):
            return claimed
        for e in entries.values():
            if e is not claimed and e.token_matches(token):
                return e
        return None
