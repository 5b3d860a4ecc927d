"""Admission control: stream slots and byte leases, per client and in all."""

from __future__ import annotations

import threading

import pytest
from google.rpc import error_details_pb2

from store_svc.limits import Admission, ByteLease, Limits, Overloaded, client_of


def refused(admission: Admission, client: str, match: str) -> None:
    with pytest.raises(Overloaded, match=match), admission.stream(client):
        pytest.fail("admitted")


def test_streams_are_bounded_per_client_and_in_all() -> None:
    admission = Admission(Limits(max_streams=3, max_streams_per_client=2))
    with admission.stream("a"), admission.stream("a"):
        refused(admission, "a", "a holds 2 streams in flight, the limit per client is 2")
        with admission.stream("b"):
            refused(admission, "c", "server holds 3 streams in flight")
    # Everything was given back: the full allowance is free again.
    with admission.stream("a"), admission.stream("a"), admission.stream("b"):
        pass


def test_byte_leases_are_bounded_and_given_back_when_the_stream_ends() -> None:
    admission = Admission(Limits(max_bytes=100, max_bytes_per_client=60))
    with admission.stream("a") as lease:
        lease.acquire(60)
        with pytest.raises(Overloaded, match="limit per client is 60"):
            lease.acquire(1)
        assert lease.held == 60  # a refused acquire takes nothing
        lease.release(20)
        lease.acquire(20)
        with admission.stream("b") as other:
            with pytest.raises(Overloaded, match="holds 60 bytes in flight, its limit is 100"):
                other.acquire(41)
            other.acquire(40)
    with admission.stream("c") as lease:  # a's and b's bytes were released with their streams
        lease.acquire(60)


def test_the_refusal_asks_for_a_retry_after_a_delay() -> None:
    (detail,) = Overloaded("busy").details()
    assert isinstance(detail, error_details_pb2.RetryInfo)
    assert detail.retry_delay.seconds >= 1


def test_no_limit_means_unlimited_and_negative_limits_are_refused() -> None:
    admission = Admission(Limits())
    with admission.stream("a") as lease:
        lease.acquire(1 << 50)
    ByteLease(None, "x").acquire(1 << 50)
    with pytest.raises(ValueError, match="0 \\(unlimited\\) or positive"):
        Limits(max_streams=-1)


def _ask(admission: Admission, asked: threading.Barrier, outcomes: list[bool]) -> None:
    """Ask for a slot; an admitted caller holds it until every caller has asked."""
    try:
        with admission.stream("a"):
            outcomes.append(True)
            asked.wait(10)
    except Overloaded:
        outcomes.append(False)
        asked.wait(10)


def test_racing_streams_get_exactly_the_free_slots() -> None:
    """Eight threads ask at once, round after round: exactly the limit gets in."""
    admission = Admission(Limits(max_streams=4))
    for _ in range(20):
        asked, outcomes = threading.Barrier(8), list[bool]()
        threads = [
            threading.Thread(target=_ask, args=(admission, asked, outcomes)) for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == [False] * 4 + [True] * 4
    with admission.stream("a"), admission.stream("a"), admission.stream("a"), admission.stream("a"):
        refused(admission, "a", "limit is 4")


@pytest.mark.parametrize(
    ("principal", "peer", "client"),
    [
        ("pipeline", "ipv4:10.0.0.7:53211", "pipeline"),
        (None, "ipv4:10.0.0.7:53211", "ipv4:10.0.0.7"),
        (None, "ipv6:[::1]:40000", "ipv6:[::1]"),
        (None, "unix:/tmp/socket", "unix:/tmp/socket"),
    ],
)
def test_clients_are_principals_or_hosts(principal: str | None, peer: str, client: str) -> None:
    assert client_of(principal, peer) == client
