"""The benchmark gate (`benches/compare.py`): exit 0 when every gated ratio holds within the
tolerance, 1 when one regressed beyond it or is missing, whatever the absolute rates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

COMPARE = Path(__file__).resolve().parents[1] / "benches" / "compare.py"
BASELINE = {"tolerance": 0.5, "ratios": {"a_vs_b": 0.6, "c_vs_d": 0.3}}


def gate(tmp_path: Path, ratios: dict[str, float], *extra: str) -> tuple[int, str]:
    result, baseline = tmp_path / "result.json", tmp_path / "baseline.json"
    result.write_text(json.dumps({"ratios": ratios, "appends": {"ignored": 1e9}}))
    baseline.write_text(json.dumps(BASELINE))
    done = subprocess.run([sys.executable, str(COMPARE), str(result), str(baseline), *extra],
                          capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize(("ratios", "code"), [
    ({"a_vs_b": 0.6, "c_vs_d": 0.3}, 0),
    ({"a_vs_b": 0.31, "c_vs_d": 0.9, "ungated_vs_x": 0.01}, 0),  # within 50%; ungated ignored
    ({"a_vs_b": 0.29, "c_vs_d": 0.3}, 1),  # more than 50% below
    ({"a_vs_b": 0.6}, 1),  # a gated figure is missing
])
def test_gate_exit_codes(tmp_path: Path, ratios: dict[str, float], code: int) -> None:
    returncode, output = gate(tmp_path, ratios)
    assert returncode == code, output
    if code:
        assert "a_vs_b" in output or "c_vs_d" in output


def test_tolerance_override(tmp_path: Path) -> None:
    assert gate(tmp_path, {"a_vs_b": 0.5, "c_vs_d": 0.3}, "--tolerance", "0.1")[0] == 1
    assert gate(tmp_path, {"a_vs_b": 0.55, "c_vs_d": 0.3}, "--tolerance", "0.1")[0] == 0


def test_paired_ratios_alternate_and_take_the_median() -> None:
    """benches/paired.py measures ours and the baseline in turn and gates on the median of
    the pairs' ratios, so one pair taken while the machine was busy does not move it."""
    sys.path.insert(0, str(COMPARE.parent))
    try:
        from paired import paired
    finally:
        sys.path.remove(str(COMPARE.parent))
    calls: list[str] = []
    ours_rates, baseline_rates = iter([10.0, 20.0, 30.0]), iter([10.0, 10.0, 60.0])

    def ours() -> float:
        calls.append("ours")
        return next(ours_rates)

    async def baseline() -> float:
        calls.append("baseline")
        return next(baseline_rates)

    result = trio.run(paired, "test", ours, baseline, 3)
    assert calls == ["ours", "baseline"] * 3
    assert result["ratio"] == 1.0  # the pairs' ratios are 1, 2 and 0.5
    assert (result["ours"], result["baseline"]) == (20.0, 10.0)
    assert result["pairs"] == [[10.0, 10.0], [20.0, 10.0], [30.0, 60.0]]


def test_the_load_generators_requests_are_what_protobuf_would_build() -> None:
    """benches/core.py splices fresh ids into pre-serialized events: the bytes must parse as
    the request a client builds with protobuf (and the server validates), every id fresh."""
    import uuid

    sys.path.insert(0, str(COMPARE.parent))
    try:
        import core
    finally:
        sys.path.remove(str(COMPARE.parent))
    from eventstore.v1 import eventstore_pb2 as pb

    stream = str(uuid.uuid4())
    built = core.AppendRequests(100).build(stream, 7)
    request = pb.AppendEventsRequest.FromString(built)
    assert (request.stream_id, request.stream_type, request.expected_version) == (
        stream, "Bench", 7)
    assert request.HasField("expected_version") and len(request.events) == 100
    ids = [event.event_id for event in request.events]
    assert len(set(ids)) == 100 and all(str(uuid.UUID(i)) == i for i in ids)
    assert all(uuid.UUID(i).version == 4 for i in ids)
    assert {(e.event_type, e.data, e.metadata) for e in request.events} == {
        ("WordAdded", core.PAYLOAD, core.METADATA)}
    # Field for field what protobuf itself would build (its bytes put expected_version last).
    expected = pb.AppendEventsRequest(
        stream_id=stream, stream_type="Bench", expected_version=7,
        events=[pb.NewEvent(event_id=i, event_type="WordAdded", data=core.PAYLOAD,
                            metadata=core.METADATA) for i in ids])
    assert request == expected
    assert core.AppendRequests(1).build(stream, 0) != core.AppendRequests(1).build(stream, 0)
