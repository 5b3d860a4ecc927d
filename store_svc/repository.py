"""The store's data plane: chunks, manifests, refs, GC and verification over one backend.

The gRPC servicer only translates messages to calls on a ``Repository``; anything that
decides something lives here or in the modules it composes. Calls made for a tenant
(``tenant`` not None) see only what that tenant stored (``store_svc.tenancy``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from clients._generated.deltavault.common.v1 import common_pb2
from store_svc.backends.base import Backend, BackendError, BackendUnavailable
from store_svc.cas import ChunkSink, ChunkStore, CompressionPolicy, chunk_key
from store_svc.digest import Digest
from store_svc.errors import (
    ChunkNotFound,
    CorruptObject,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RefConflict,
    StoreError,
)
from store_svc.gc import GarbageCollector, GcStats
from store_svc.identity import Tenant
from store_svc.locking import SharedExclusiveLock
from store_svc.manifests import (
    CommitResult,
    ManifestStore,
    chunk_digests,
    manifest_key,
)
from store_svc.refs import RefName, RefStore
from store_svc.signatures import (
    SignatureError,
    SignaturePolicy,
    SignatureStore,
    UntrustedSigner,
    check_signature,
    trusted_signers,
)
from store_svc.tenancy import Kind, TenantChunks, TenantLedger


@dataclass(frozen=True)
class Damage:
    key: str
    digest: Digest
    problem: str


@dataclass
class VerifyReport:
    chunks_checked: int = 0
    manifests_checked: int = 0
    bytes_checked: int = 0
    damaged: list[Damage] = field(default_factory=list)


@dataclass(frozen=True)
class RefMove:
    """Move ``ref`` to a new target if it points at ``expected`` (None: absent), or always."""

    ref: RefName
    expected: Digest | None
    force: bool = False


class Repository:
    def __init__(
        self,
        backend: Backend,
        *,
        max_chunk_bytes: int,
        compression: CompressionPolicy = CompressionPolicy.AUTO,
        signature_policy: SignaturePolicy | None = None,
    ) -> None:
        self.backend = backend
        self.signature_policy = signature_policy or SignaturePolicy()
        self.signatures = SignatureStore(backend)
        # Shared: a manifest commit or a ref move (check, write, move); exclusive: GC's sweep.
        self._lock = SharedExclusiveLock()
        self.chunks = ChunkStore(backend, policy=compression, max_chunk_bytes=max_chunk_bytes)
        self.manifests = ManifestStore(backend, self.chunks)
        self.refs = RefStore(backend)
        self.tenants = TenantLedger(backend)
        self._gc = GarbageCollector(backend, self.manifests, self.refs, self.tenants, self._lock)

    def close(self) -> None:
        """Stop the probe threads and release the backend."""
        self.chunks.close()
        self.tenants.close()
        self.backend.close()

    def missing_chunks(self, digests: Sequence[Digest], tenant: Tenant | None) -> list[Digest]:
        """Which of ``digests`` the store (or the tenant) lacks, in order, without repeats."""
        if tenant is None:
            return self.chunks.missing(digests)
        return self.tenants.unowned(tenant.name, Kind.CHUNK, digests)

    def chunk_sink(self, tenant: Tenant | None) -> ChunkSink:
        """Where an upload for ``tenant`` stores its chunks."""
        if tenant is None:
            return self.chunks
        return TenantChunks(self.chunks, self.tenants, tenant, self._lock)

    def get_chunk(self, digest: Digest, tenant: Tenant | None) -> memoryview:
        """A chunk's verified bytes; absent for a tenant that did not upload it."""
        if tenant is not None and not self.tenants.owns(tenant.name, Kind.CHUNK, digest):
            raise ChunkNotFound([digest], context="read")
        return self.chunks.get(digest)

    def get_manifest(self, digest: Digest, tenant: Tenant | None) -> common_pb2.Manifest:
        if not self._has_manifest(digest, tenant):
            raise NotFound(f"no manifest {digest}")
        return self.manifests.get(digest)

    def get_signed_manifest(
        self, digest: Digest, tenant: Tenant | None
    ) -> tuple[common_pb2.Manifest, list[common_pb2.ManifestSignature]]:
        """A manifest and the signatures stored beside it, by key id."""
        return self.get_manifest(digest, tenant), self.signatures.of(digest)

    def commit(
        self,
        manifest: common_pb2.Manifest,
        move: RefMove | None = None,
        tenant: Tenant | None = None,
        signatures: Sequence[common_pb2.ManifestSignature] = (),
    ) -> tuple[CommitResult, Digest | None]:
        """Store a manifest with its ``signatures`` (checked against the signature policy
        first) and optionally move a ref to it; returns the ref's old target. A tenant's
        manifest may name only chunks the tenant uploaded, and it learns only whether *it*
        had committed the manifest before."""
        # A tenant's chunks are those it has markers for (a marker implies the chunk): the
        # store's own presence check would tell it which of the others exist.
        unowned = None if tenant is None else partial(self.tenants.unowned, tenant.name, Kind.CHUNK)
        # A compare-and-swap that is lost already writes nothing; one lost to a writer
        # racing in after this check leaves an unreferenced manifest, for GC.
        check_ref = move is not None and not move.force

        def before_write(digest: Digest) -> None:
            self._check_signatures(digest, signatures)
            if check_ref:
                assert move is not None
                self._check_ref(move)

        with self._lock.shared():
            result = self.manifests.commit(
                manifest, find_missing=unowned, before_write=before_write
            )
            self.signatures.add(result.digest, signatures)
            if tenant is not None:
                new = self.tenants.claim_manifest(tenant.name, result.digest)
                result = replace(result, already_present=not new)
            previous = None
            if move is not None:
                previous = self.refs.update(
                    move.ref, result.digest, move.expected, force=move.force
                )
        return result, previous

    def update_ref(
        self, target: Digest, move: RefMove, tenant: Tenant | None = None
    ) -> Digest | None:
        """Point a ref at a stored manifest (compare-and-swap); returns the old target. The
        check and the move hold the commit lock, so a sweep cannot take the manifest between
        them."""
        with self._lock.shared():
            if not self._has_manifest(target, tenant):
                raise FailedPrecondition(
                    f"no manifest {target}: commit it before pointing a ref at it"
                )
            return self.refs.update(move.ref, target, move.expected, force=move.force)

    def collect_garbage(self, *, grace_seconds: float, dry_run: bool) -> GcStats:
        return self._gc.collect(grace_seconds=grace_seconds, dry_run=dry_run)

    def verify(self, manifest: Digest | None = None, tenant: Tenant | None = None) -> VerifyReport:
        """Re-hash one manifest and its chunks, or every stored object (not for a tenant)."""
        if manifest is None and tenant is not None:
            raise PermissionDenied(
                f"tenant {tenant.name!r} may verify its own manifests only: name one"
            )
        if manifest is not None and not self._has_manifest(manifest, tenant):
            raise NotFound(f"no manifest {manifest}")
        report = VerifyReport()
        if manifest is not None:
            chunks = self._verify_manifest(manifest, report)
        else:
            for digest in list(self.manifests.iter_digests()):
                self._verify_manifest(digest, report)
            chunks = list(self.chunks.iter_digests())
        for digest in chunks:
            self._verify_chunk(digest, report)
        return report

    def _check_signatures(
        self, digest: Digest, signatures: Sequence[common_pb2.ManifestSignature]
    ) -> None:
        """Refuse a bad signature always; an untrusted signer or none, as configured."""
        policy = self.signature_policy
        try:
            signers = trusted_signers(signatures, digest, policy.trusted)
        except UntrustedSigner as exc:
            raise PermissionDenied(f"manifest not committed: {exc}") from None
        except SignatureError as exc:
            raise InvalidArgument(f"manifest not committed: {exc}") from None
        if policy.required and not signers and not self._signed_before(digest):
            by = "a trusted key" if policy.trusted is not None else "an Ed25519 key"
            raise FailedPrecondition(
                f"manifest {digest} not committed: this store requires manifests signed by "
                f"{by} (sign with `deltavault keys generate` and --signing-key)"
            )

    def _signed_before(self, digest: Digest) -> bool:
        """Whether the stored manifest ``digest`` already carries a signature the policy
        accepts: committing it again (to move a ref) needs no new one."""
        trusted = self.signature_policy.trusted
        for signature in self.signatures.of(digest):
            try:
                signer = check_signature(signature, digest)
            except SignatureError:
                continue
            if trusted is None or signer in trusted:
                return True
        return False

    def _check_ref(self, move: RefMove) -> None:
        current = self.refs.resolve(move.ref)
        if current != move.expected:
            raise RefConflict(str(move.ref), move.expected, current)

    def _has_manifest(self, digest: Digest, tenant: Tenant | None) -> bool:
        if tenant is None:
            return self.manifests.exists(digest)
        return self.tenants.owns(tenant.name, Kind.MANIFEST, digest)

    def _verify_manifest(self, digest: Digest, report: VerifyReport) -> list[Digest]:
        report.manifests_checked += 1
        try:
            manifest = self.manifests.get(digest)
        except StoreError as exc:
            report.damaged.append(Damage(manifest_key(digest), digest, str(exc)))
            return []
        return chunk_digests(manifest)

    def _verify_chunk(self, digest: Digest, report: VerifyReport) -> None:
        report.chunks_checked += 1
        try:
            report.bytes_checked += len(self.chunks.get(digest))
        except ChunkNotFound:
            report.damaged.append(Damage(chunk_key(digest), digest, "missing"))
        except CorruptObject as exc:
            report.damaged.append(Damage(chunk_key(digest), digest, exc.reason))
        except BackendUnavailable:
            raise  # an outage is not damage: the call fails UNAVAILABLE, to be retried
        except BackendError as exc:
            report.damaged.append(Damage(chunk_key(digest), digest, f"unreadable: {exc}"))
