"""What the services' fuzz tests share: hypothesis settings sized for a small machine, one
call run to its end, the answer a case expects, strategies for the fields both services
take (digests, ref names), and a snapshot of what a backend holds.

``DELTAVAULT_FUZZ_EXAMPLES`` sets how many cases every fuzz test tries (a long run);
unset, each test tries its own default, chosen so that both fuzz modules together take
about 90 s on two cores.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from clients._generated.deltavault.common.v1 import common_pb2
from store_svc.backends.base import Backend
from store_svc.digest import Algorithm, Digest

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

EXAMPLES_ENV = "DELTAVAULT_FUZZ_EXAMPLES"
DEADLINE_SECONDS = 30.0
"""Every fuzzed call's deadline: a hang ends as DEADLINE_EXCEEDED, which no case allows."""

Code = grpc.StatusCode
OK = Code.OK
INVALID = frozenset({Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE, Code.RESOURCE_EXHAUSTED})
"""The codes that refuse a malformed request."""


def fuzz_settings(examples: int) -> settings:
    """A fuzz test's settings: ``examples`` cases unless ``DELTAVAULT_FUZZ_EXAMPLES`` says
    otherwise; no per-case deadline (each call has its own); no example database, so a run
    does not depend on what earlier runs failed on (a bug found gets an ``@example``)."""
    return settings(
        max_examples=int(os.environ.get(EXAMPLES_ENV) or examples),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- a call and the answer it must get ----------------------------------------------------


@dataclass(frozen=True)
class Outcome(Generic[T_co]):
    """How a call ended: its status, the status message, the responses before the end."""

    code: Code
    details: str
    responses: tuple[T_co, ...]


def run_call(call: Callable[[], Iterable[T]]) -> Outcome[T]:
    """Run ``call`` to its end; a unary call is passed as ``lambda: [stub.Method(...)]``."""
    responses: list[T] = []
    try:
        for response in call():
            responses.append(response)
    except grpc.RpcError as error:
        if not isinstance(error, grpc.Call):  # a finished call's error is both
            raise
        return Outcome(error.code(), error.details() or "", tuple(responses))
    return Outcome(OK, "", tuple(responses))


@dataclass(frozen=True)
class Expected:
    """The answers a case allows: a code of ``codes``; for a refusal, a message that
    contains one of ``words`` (the field at fault, or the rule it breaks), in any case
    (no words: any message, but one there must be)."""

    codes: frozenset[Code]
    words: tuple[str, ...] = ()

    def check(self, outcome: Outcome[object]) -> None:
        if currently_in_test_context():  # hypothesis' statistics count the codes reached
            event(outcome.code.name)
        allowed = sorted(code.name for code in self.codes)
        assert outcome.code in self.codes, (
            f"expected {allowed}, got {outcome.code.name}: {outcome.details!r}"
        )
        if outcome.code is OK:
            return
        assert outcome.details.strip(), f"{outcome.code.name} without a message"
        text = outcome.details.lower()
        assert not self.words or any(word.lower() in text for word in self.words), (
            f"{outcome.code.name} {outcome.details!r} names none of {self.words}"
        )


def refused(*words: str, codes: Iterable[Code] = INVALID) -> Expected:
    """A fault: the request must be refused with ``codes``, naming one of ``words``."""
    return Expected(frozenset(codes), words)


def either(*cases: Expected) -> Expected:
    """Any answer one of ``cases`` allows (a refusal naming any of their words)."""
    return Expected(
        frozenset().union(*(case.codes for case in cases)),
        tuple(word for case in cases for word in case.words),
    )


def accepted(*refusals: Expected) -> Expected:
    """A well-formed request: OK, or one of ``refusals`` (a ref that is absent, ...)."""
    return either(Expected(frozenset({OK})), *refusals)


def expect(faults: Sequence[Expected], otherwise: Callable[[], Expected]) -> Expected:
    """What a request with ``faults`` must get: refused for one of them (the service may
    report any one first); without faults, ``otherwise()`` (called only then: it may read
    the request's fields as well-formed)."""
    return either(*faults) if faults else otherwise()


Faulty = tuple[T, tuple[Expected, ...]]
"""A generated field value and what is wrong with it (nothing: a well-formed value)."""


def mostly(good: st.SearchStrategy[T], bad: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``good`` about three times in four, else ``bad``: a request of several fields is
    then often well-formed as a whole, and its cases reach past validation."""
    return st.one_of(good, good, good, bad)


def maybe(
    strict: bool, good: st.SearchStrategy[T], bad: st.SearchStrategy[T]
) -> st.SearchStrategy[T]:
    """``good`` for a strict case (one meant to be well-formed), else mostly ``good``: a
    request of many fields nearly always has one at fault otherwise."""
    return good if strict else mostly(good, bad)


# --- digests --------------------------------------------------------------------------

ALGORITHMS = (common_pb2.DIGEST_ALGORITHM_BLAKE3, common_pb2.DIGEST_ALGORITHM_SHA256)


def damaged(draw: st.DrawFn, valid: bytes) -> bytes:
    """Bytes near a well-formed serialized request: random ones, or ``valid`` truncated,
    with a byte flipped, or with bytes appended."""
    position = draw(st.integers(0, max(len(valid) - 1, 0)))
    flipped = bytearray(valid)
    if flipped:
        flipped[position] ^= draw(st.integers(1, 255))
    return draw(
        st.one_of(
            st.binary(max_size=200),
            st.just(valid[:position]),
            st.just(bytes(flipped)),
            st.binary(min_size=1, max_size=20).map(lambda tail: valid + tail),
        )
    )


def random_digests() -> st.SearchStrategy[Digest]:
    """Well-formed digests of nothing anyone stored."""
    return st.builds(Digest, st.sampled_from(list(Algorithm)), st.binary(min_size=32, max_size=32))


def malformed_digests() -> st.SearchStrategy[common_pb2.Digest]:
    """Digests of the wrong length or of an algorithm that does not exist (0: unset)."""
    wrong_length = st.builds(
        common_pb2.Digest,
        algorithm=st.sampled_from(ALGORITHMS),
        value=st.binary(max_size=80).filter(lambda v: len(v) != 32),
    )
    unknown_algorithm = st.builds(
        common_pb2.Digest,
        algorithm=st.integers(-(2**31), 2**31 - 1).filter(lambda a: a not in ALGORITHMS),
        value=st.binary(max_size=40),
    )
    return st.one_of(wrong_length, unknown_algorithm)


def digest_fields(
    good: st.SearchStrategy[Digest], name: str
) -> st.SearchStrategy[Faulty[common_pb2.Digest]]:
    """A digest field: one of ``good``, or malformed (a fault naming the field ``name``)."""
    well_formed: st.SearchStrategy[Faulty[common_pb2.Digest]] = good.map(
        lambda d: (d.to_proto(), ())
    )
    return mostly(well_formed, malformed_digests().map(lambda p: (p, (refused(name),))))


def optional_digest_fields(
    good: st.SearchStrategy[Digest], name: str
) -> st.SearchStrategy[Faulty[common_pb2.Digest | None]]:
    """A digest field that may be left unset (None)."""
    unset: st.SearchStrategy[Faulty[common_pb2.Digest | None]] = st.just((None, ()))
    return st.one_of(unset, digest_fields(good, name))


# --- ref names ------------------------------------------------------------------------

FUZZ_NAMESPACE = "fz"
"""The namespace fuzzed refs live in; the fixtures' refs elsewhere are never fuzzed."""
_SEGMENT = "[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
VALID_REF = re.compile(f"{_SEGMENT}/{_SEGMENT}")
"""The documented rule for a ref name (``fullmatch``)."""

NASTY_REFS = (
    "",
    "fz",
    "fz/",
    "/fz",
    "fz//a",
    "fz/a/",
    "fz/a/b",
    "../etc/passwd",
    "fz/..",
    "fz/../seed",
    "..",
    "./fz",
    "fz/.a",
    "fz/-a",
    "fz/a b",
    "fz/a\nb",
    "fz/a\n",
    "fz\n/a",
    "fz/a\x00",
    "fz/a\r",
    "fz/\t",
    "fz/é",
    "fz/a\\b",
    "C:\\fz/a",
    "\uff46\uff5a/a",  # fullwidth "fz"
    "fz/%2e%2e",
    "fz/" + "a" * 129,
    "a" * 129 + "/a",
)
"""Ref names that break the rule: separators, traversal, control characters, unicode,
empty segments, too long."""


def valid_refs() -> st.SearchStrategy[str]:
    """Well-formed refs in the fuzz namespace, mostly from a small pool (so they collide
    and compare-and-swap paths are reached), sometimes any name, up to the longest."""
    pool = st.sampled_from([f"{FUZZ_NAMESPACE}/{n}" for n in ("a", "b", "m-1.2_x")])
    anything = st.from_regex(f"{_SEGMENT}", fullmatch=True).map(
        lambda name: f"{FUZZ_NAMESPACE}/{name}"
    )
    return st.one_of(pool, anything, st.just(f"{FUZZ_NAMESPACE}/" + "a" * 128))


def bad_refs() -> st.SearchStrategy[str]:
    """Ref names that break the rule."""
    arbitrary = st.text(max_size=40).filter(lambda text: not VALID_REF.fullmatch(text))
    return st.one_of(st.sampled_from(NASTY_REFS), arbitrary)


def ref_fields(name: str = "ref") -> st.SearchStrategy[Faulty[str]]:
    """A ref field: well-formed, or broken (a fault naming ``name``)."""
    good: st.SearchStrategy[Faulty[str]] = valid_refs().map(lambda ref: (ref, ()))
    return mostly(good, bad_refs().map(lambda ref: (ref, (refused(name),))))


# --- what a backend holds -------------------------------------------------------------


def stored(backend: Backend) -> dict[str, tuple[int, float]]:
    """Every object the backend holds: key → (size, modification time)."""
    return {info.key: (info.size, info.modified) for info in backend.list("")}
