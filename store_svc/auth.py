"""Bearer-token authentication and roles, for both services.

A tokens file (JSON) names each caller, its role and its token, in plain text or as the
SHA-256 of it (so the file need not hold the secret itself)::

    {"tenants": {"team-a": {"quota_bytes": 107374182400}},
     "tokens": [
        {"name": "pipeline", "role": "writer", "sha256": "9f86d08...", "tenant": "team-a"},
        {"name": "dashboard", "role": "reader", "token": "..."}
    ]}

A token with a ``tenant`` is confined to it (``store_svc.tenancy``): its refs are those of
the namespace of that name, it sees only the chunks and manifests it uploaded itself, and
its chunk bytes are capped by the tenant's ``quota_bytes`` (absent: no cap). A token
without one is unconfined (operators, the compressor's own identity). Only unconfined
admins collect garbage or verify the whole store.

Calls carry ``authorization: Bearer <token>``. A presented token is hashed and compared
with every entry's digest in constant time (``hmac.compare_digest``, no early exit), so
neither a token nor how much of one matched leaks through timing. Roles nest:

- ``reader``: read chunks, manifests and refs, verify, reconstruct, plan;
- ``writer``: also upload chunks, commit manifests, move refs, compress;
- ``admin``: also delete refs and collect garbage.

A method not listed is admin-only, so a new RPC is closed until someone opens it. The
health and reflection services need no token (probes and tooling). The file is re-read
when its modification time changes, so tokens rotate without a restart.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from store_svc.errors import InvalidArgument, PermissionDenied, Unauthenticated
from store_svc.identity import Tenant
from store_svc.refs import RefName

log = logging.getLogger(__name__)


class Role(enum.IntEnum):
    READER = 1
    WRITER = 2
    ADMIN = 3


METHOD_ROLES: dict[str, Role] = {
    # deltavault.store.v1.DeltaStore
    "MissingChunks": Role.READER,
    "GetChunks": Role.READER,
    "GetManifest": Role.READER,
    "ResolveRef": Role.READER,
    "ListRefs": Role.READER,
    "Verify": Role.READER,
    "PutChunks": Role.WRITER,
    "CommitManifest": Role.WRITER,
    "UpdateRef": Role.WRITER,
    "DeleteRef": Role.ADMIN,
    "CollectGarbage": Role.ADMIN,
    # deltavault.compressor.v1.Compressor
    "Reconstruct": Role.READER,
    "Plan": Role.READER,
    "Compress": Role.WRITER,
}
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
"""Services any caller may use: probes and tooling carry no token."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    digest: bytes
    tenant: Tenant | None = None


def _tenants(section: object) -> dict[str, Tenant]:
    """The ``tenants`` section: name -> quota. A name must be a valid ref namespace."""
    if not isinstance(section, dict):
        raise ValueError("tenants must be an object of name: {quota_bytes}")
    tenants = {}
    for name, settings in section.items():
        try:
            RefName.parse(f"{name}/x")
        except InvalidArgument:
            raise ValueError(f"tenant {name!r} is not a valid ref namespace") from None
        quota = dict(settings).get("quota_bytes")
        if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int)):
            raise ValueError(f"tenant {name!r}: quota_bytes must be an integer")
        if quota is not None and quota < 0:
            raise ValueError(f"tenant {name!r}: quota_bytes must not be negative")
        tenants[name] = Tenant(name, quota)
    return tenants


def _principal(entry: dict[str, object], tenants: dict[str, Tenant]) -> Principal:
    name = str(entry["name"])
    role = Role[str(entry["role"]).upper()]
    if ("token" in entry) == ("sha256" in entry):
        raise ValueError(f"{name!r} needs exactly one of token, sha256")
    if "token" in entry:
        digest = _digest(str(entry["token"]))
    else:
        digest = bytes.fromhex(str(entry["sha256"]))
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError(f"{name!r}: sha256 is not 32 bytes of hex")
    tenant = None
    if "tenant" in entry:
        # A tenant without a ``tenants`` entry has no quota.
        tenant_name = str(entry["tenant"])
        tenant = tenants.get(tenant_name) or _tenants({tenant_name: {}})[tenant_name]
    return Principal(name, role, digest, tenant)


def parse_tokens(text: str, source: str) -> list[Principal]:
    """The entries of a tokens file; ValueError naming ``source`` when malformed."""
    try:
        document = json.loads(text)
        tenants = _tenants(document.get("tenants", {}))
        principals = [_principal(entry, tenants) for entry in document["tokens"]]
    except (KeyError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as exc:
        detail = f"unknown role or missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"tokens file {source}: {detail}") from None
    if not principals:
        raise ValueError(f"tokens file {source} names no tokens")
    return principals


class TokenTable:
    """The callers of a tokens file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp = path.stat().st_mtime_ns
        self._principals = parse_tokens(path.read_text(), str(path))

    def _current(self) -> list[Principal]:
        try:
            stamp = self._path.stat().st_mtime_ns
        except OSError:
            return self._principals  # mid-rotation: keep the tokens we have
        if stamp != self._stamp:
            with self._lock:
                try:
                    self._principals = parse_tokens(self._path.read_text(), str(self._path))
                    log.info("tokens reloaded from %s", self._path)
                except (OSError, ValueError) as exc:
                    log.warning("tokens not reloaded: %s", exc)
                self._stamp = stamp
        return self._principals

    def principal(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
        """The caller a call's ``authorization`` metadata names; Unauthenticated if none."""
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if isinstance(header, bytes):
            header = header.decode(errors="replace")
        if not header or not header.startswith("Bearer "):
            raise Unauthenticated("this service needs a bearer token (authorization metadata)")
        presented = _digest(header.removeprefix("Bearer ").strip())
        found = None
        for principal in self._current():
            if hmac.compare_digest(presented, principal.digest) and found is None:
                found = principal
        if found is None:
            raise Unauthenticated("the bearer token is not valid here")
        return found

    def authorize(
        self, full_method: str, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> Principal | None:
        """The caller of ``full_method`` (/package.Service/Method) if it may call it; None
        for the open services. Unauthenticated or PermissionDenied otherwise."""
        if full_method.lstrip("/").startswith(OPEN_SERVICES):
            return None
        principal = self.principal(metadata)
        method = full_method.rsplit("/", 1)[-1]
        needed = METHOD_ROLES.get(method, Role.ADMIN)
        if principal.role < needed:
            raise PermissionDenied(
                f"{principal.name} is a {principal.role.name.lower()}; {method} needs "
                f"{needed.name.lower()}"
            )
        return principal


def open_tokens(path: Path | None) -> TokenTable | None:
    """The token table of a tokens file, or None (no authentication) without one."""
    return None if path is None else TokenTable(path)
