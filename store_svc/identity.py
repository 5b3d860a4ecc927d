"""Who is calling: read from call metadata in exactly one place.

The server's interceptor authenticates each RPC (``store_svc.auth``) and sets
``current_caller`` for the handler's duration; handlers ask ``current_caller.get()``.
Without a tokens file every caller is the anonymous, unconfined caller.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Tenant:
    """A tenant owns one ref namespace (its name) and the chunks and manifests it
    uploaded (``store_svc.tenancy``), up to ``quota_bytes`` of chunk bytes (None: no cap)."""

    name: str
    quota_bytes: int | None = None


@dataclass(frozen=True)
class Caller:
    principal: str
    tenant: Tenant | None = None
    """The tenant the caller is confined to; None: unconfined (operators, no auth)."""

    def may_use(self, namespace: str) -> bool:
        return self.tenant is None or namespace == self.tenant.name


ANONYMOUS_CALLER = Caller(ANONYMOUS)
"""Every caller of a service without a tokens file."""

current_caller: ContextVar[Caller] = ContextVar("current_caller")
"""The caller of the RPC being handled on this thread (unset outside a handler: no default,
so a handler reached without the interceptor fails instead of running unconfined)."""
