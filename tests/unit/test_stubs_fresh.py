"""The committed stubs in clients/_generated match what protos/ generates now."""

import subprocess
import sys
from pathlib import Path

from clients import codegen


def test_committed_stubs_match_protos() -> None:
    # A process of its own: protoc's bundled C++ protobuf aborts beside ortools' copy.
    result = subprocess.run(
        [sys.executable, "-m", "clients.codegen", "--check"],
        cwd=Path(codegen.__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"stubs are stale: run `make protos`\n{result.stderr}"


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
