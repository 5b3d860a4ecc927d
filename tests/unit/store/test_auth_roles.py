"""Every RPC of both services has a role (an unlisted one would silently be admin-only),
and roles nest."""

from __future__ import annotations

from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients._generated.deltavault.store.v1 import store_pb2
from store_svc.auth import METHOD_ROLES, Role


def test_every_method_has_a_role() -> None:
    methods = {
        method.name
        for module, service in ((store_pb2, "DeltaStore"), (compressor_pb2, "Compressor"))
        for method in module.DESCRIPTOR.services_by_name[service].methods
    }
    assert methods == set(METHOD_ROLES)


def test_destructive_calls_need_admin_and_reads_a_reader() -> None:
    assert METHOD_ROLES["DeleteRef"] is METHOD_ROLES["CollectGarbage"] is Role.ADMIN
    assert METHOD_ROLES["Compress"] is METHOD_ROLES["UpdateRef"] is Role.WRITER
    assert METHOD_ROLES["GetChunks"] is METHOD_ROLES["ListRefs"] is Role.READER
    assert Role.READER < Role.WRITER < Role.ADMIN
