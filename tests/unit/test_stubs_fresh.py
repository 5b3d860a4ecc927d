"""The committed stubs in clients/_generated match what protos/ generates now."""

from clients import codegen


def test_committed_stubs_match_protos() -> None:
    assert codegen.main(["--check"]) == 0, "stubs are stale: run `make protos` and commit"


def test_rewrite_is_anchored_to_our_packages() -> None:
    source = (
        "from deltavault.common.v1 import common_pb2 as c\n"
        "import deltavault.store.v1.store_pb2\n"
        "from google.protobuf import descriptor\n"
        "x = 'from deltavault.common.v1 import y'\n"
    )
    assert codegen.rewrite_imports(source) == (
        "from clients._generated.deltavault.common.v1 import common_pb2 as c\n"
        "import clients._generated.deltavault.store.v1.store_pb2\n"
        "from google.protobuf import descriptor\n"
        "x = 'from deltavault.common.v1 import y'\n"
    )
