"""Who is calling: read from call metadata in exactly one place.

The server's interceptor calls ``caller_from_metadata`` once per RPC and sets
``current_caller`` for the handler's duration; handlers ask ``current_caller.get()``.
Today every caller is anonymous and may use every namespace. TLS identities, bearer
tokens and tenants plug in here without changing the API or the handlers, which ask only
``caller.may_use(namespace)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Caller:
    principal: str
    namespaces: frozenset[str] | None
    """Namespaces this caller may use; None means all."""

    def may_use(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces


def caller_from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller:
    """The caller behind a call's invocation metadata."""
    del metadata  # no authentication configured: everyone is the anonymous caller
    return Caller(ANONYMOUS, None)


current_caller: ContextVar[Caller] = ContextVar("current_caller")
"""The caller of the RPC being handled on this thread."""
