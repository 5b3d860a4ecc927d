"""deltavault's Python clients: ``from clients import DeltaVault`` for the SDK, the
``deltavault`` CLI (``clients.cli``), and the store and compressor clients beneath them."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.sdk import DeltaVault

__all__ = ["DeltaVault"]


def __getattr__(name: str) -> Any:
    # Lazy, so that services importing the generated stubs do not load torch.
    if name == "DeltaVault":
        from clients.sdk import DeltaVault  # noqa: PLC0415

        return DeltaVault
    raise AttributeError(f"module 'clients' has no attribute {name!r}")
