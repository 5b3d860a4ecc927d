"""Shared fixtures: the loopback S3 server and a fresh backend of each kind per test."""

from __future__ import annotations

import os

# Triton reads this when a kernel is decorated, so it must be set before any test module
# imports kernels.triton: without a GPU the kernels then run in Triton's CPU interpreter.
# TRITON_INTERPRET=0 in the environment runs them compiled, on CUDA tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from store_svc.backends.base import Backend
from store_svc.backends.local import LocalBackend
from store_svc.backends.s3 import S3Backend
from tests.support.seaweedfs import SeaweedS3

# --- storage backends ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """One real S3 server (SeaweedFS on 127.0.0.1, or DELTAVAULT_TEST_S3_ENDPOINT) for the
    whole session."""
    with SeaweedS3() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> Iterator[str]:
    """A bucket name no other test uses; the bucket, if created, is emptied and removed
    afterwards, so an external server is left as it was found."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    yield bucket
    client = s3_server.client()
    if client.bucket_exists(bucket):
        for item in client.list_objects(bucket, recursive=True):
            client.remove_object(bucket, item.object_name)
        client.remove_bucket(bucket)


@pytest.fixture
def s3_backend(s3_server: SeaweedS3, s3_bucket: str) -> Iterator[S3Backend]:
    """A backend on a bucket of its own."""
    backend = S3Backend(s3_server.endpoint, s3_bucket, s3_server.access_key, s3_server.secret_key)
    yield backend
    backend.close()


@pytest.fixture
def local_backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(tmp_path / "store")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each test using this runs once per backend: the contract is the same for both."""
    chosen: Backend = request.getfixturevalue(f"{request.param}_backend")
    return chosen
