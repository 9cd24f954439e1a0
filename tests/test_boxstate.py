"""The shared directory: what one process publishes, another reads; bounded and failure-proof.

Charter: every test uses its own directory under tmp_path; two ``SharedDir`` objects on
one path stand for two processes of one box (they share nothing but the files). Time is
an injected wall clock; file ages are set with ``os.utime``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from voicebridge import boxstate
from voicebridge.boxstate import SharedDir, SharedStreamTokens
from voicebridge.bridge.outcome import BargeIn, CallRecord, Outcome
from voicebridge.observability.logs import record_fields
from voicebridge.twilio.token import StreamClaims, StreamTokens, TokenRejected

SECRET = b"0123456789abcdef0123456789abcdef"
NOW = 1_800_000_000.0


def a_record(call_sid: str = "CA" + "1" * 32, **changes: object) -> CallRecord:
    figures: dict[str, object] = {
        "call_sid": call_sid, "stream_sid": "MZ" + "2" * 32, "vapi_call_id": "vapi-1",
        "outcome": Outcome.ASSISTANT_ENDED, "detail": "assistant-ended-call", "duration_s": 12.5,
        "frames_from_caller": 600, "frames_to_assistant": 598, "frames_dropped": 2,
        "assistant_bytes": 64_000, "media_messages_to_caller": 80, "heard_ms": 7_980,
        "first_audio_ms": 612.5,
        "barge_ins": (BargeIn(at_s=4.0, latency_ms=1.25, heard_of_turn_ms=900, discarded_ms=300),),
    }
    figures.update(changes)
    return CallRecord(**figures)  # type: ignore[arg-type]


def two_processes(path: Path) -> tuple[SharedDir, SharedDir]:
    return SharedDir(path, clock=lambda: NOW), SharedDir(path, clock=lambda: NOW)


def test_a_record_saved_by_one_process_is_read_by_another(tmp_path: Path) -> None:
    one, other = two_processes(tmp_path / "shared")
    record = a_record(outcome=Outcome.SHUTDOWN, first_audio_ms=None)
    one.save_record(record)
    assert other.load_record(record.call_sid) == record
    assert other.load_record("CA" + "9" * 32) is None
    # Only finished files are ever visible: no temporary file is left behind.
    assert [p.name for p in (tmp_path / "shared" / "outcomes").iterdir()] == [record.call_sid]


def test_a_newer_record_replaces_the_older(tmp_path: Path) -> None:
    one, other = two_processes(tmp_path)
    one.save_record(a_record(detail="first"))
    one.save_record(a_record(detail="second"))
    loaded = other.load_record(a_record().call_sid)
    assert loaded is not None and loaded.detail == "second"


@pytest.mark.parametrize("call_sid", ["../outcomes/x", "", "CA/1", "x" * 65, "."])
def test_unsafe_call_sids_never_become_paths(tmp_path: Path, call_sid: str) -> None:
    shared = SharedDir(tmp_path)
    shared.save_record(a_record(call_sid=call_sid))
    assert not shared.claim_stream(call_sid)
    assert shared.publish_admission(call_sid, "<Response/>") is None
    shared.close_admission(call_sid)
    assert shared.load_record(call_sid) is None
    assert shared.load_admission(call_sid) is None
    assert not shared.stream_started(call_sid)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


def test_an_unreadable_record_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = SharedDir(tmp_path)
    (tmp_path / "outcomes" / "CA1").write_text("{not json")
    (tmp_path / "outcomes" / "CA2").write_text('{"format": 99, "record": {}}')
    (tmp_path / "outcomes" / "CA3").write_text('{"format": 1, "record": {"call_sid": "CA3"}}')
    with caplog.at_level(logging.WARNING, logger="voicebridge"):
        assert [shared.load_record(s) for s in ("CA1", "CA2", "CA3")] == [None, None, None]


def test_a_stream_is_claimed_once_per_box(tmp_path: Path) -> None:
    one, other = two_processes(tmp_path)
    assert not other.stream_started("CA1")
    assert one.claim_stream("CA1")
    assert other.stream_started("CA1")
    assert not other.claim_stream("CA1")
    assert not one.claim_stream("CA1")
    one.stream_ended("CA1")
    assert not other.claim_stream("CA1"), "not after it ended either"


def test_an_admission_is_published_once_and_read_by_every_process(tmp_path: Path) -> None:
    one, other = two_processes(tmp_path)
    assert other.load_admission("CA1") is None
    assert one.publish_admission("CA1", "<Response>first</Response>") is None
    # The other process, a moment late, is given the answer already published.
    assert other.publish_admission("CA1", "<Response>second</Response>") == (
        "<Response>first</Response>"
    )
    assert other.load_admission("CA1") == ("<Response>first</Response>", 0.0)
    one.close_admission("CA1")  # its reservation is over: the answer is no longer given
    assert other.load_admission("CA1") == ("", 0.0)
    assert other.publish_admission("CA1", "<Response>third</Response>") == ""
    assert sorted(p.name for p in (tmp_path / "admissions").iterdir()) == ["CA1"]


def test_a_token_is_claimed_once_per_box(tmp_path: Path) -> None:
    one, other = two_processes(tmp_path)
    assert one.claim_token("nonce-1", 1_800_000_060_000)
    assert not other.claim_token("nonce-1", 1_800_000_060_000)
    assert not one.claim_token("nonce-1", 1_800_000_060_000)
    assert other.claim_token("nonce-2", 1_800_000_060_000)


def test_stream_tokens_are_single_use_across_processes(tmp_path: Path) -> None:
    one_dir, other_dir = two_processes(tmp_path)
    issuer = StreamTokens(secret=SECRET, ttl_s=60, clock=lambda: NOW)
    one = SharedStreamTokens(secret=SECRET, ttl_s=60, shared=one_dir, clock=lambda: NOW)
    other = SharedStreamTokens(secret=SECRET, ttl_s=60, shared=other_dir, clock=lambda: NOW)
    claims = StreamClaims(call_sid="CA1", caller="+15550100001")
    token = issuer.issue(claims)
    # Every other check comes first: a forged token, or a genuine one with another
    # caller, claims nothing.
    with pytest.raises(TokenRejected) as forged:
        other.verify(token[:-2] + "AA", claims)
    assert forged.value.reason == "bad-signature"
    with pytest.raises(TokenRejected) as altered:
        other.verify(token, StreamClaims(call_sid="CA1", caller="+15550199999"))
    assert altered.value.reason == "wrong-parameters"
    one.verify(token, claims)
    with pytest.raises(TokenRejected) as rejected:
        other.verify(token, claims)
    assert rejected.value.reason == "reused"
    assert len(list((tmp_path / "tokens").iterdir())) == 1


def test_sweep_deletes_what_expired_and_keeps_the_rest(tmp_path: Path) -> None:
    shared = SharedDir(tmp_path, clock=lambda: NOW)
    for call_sid, age_s in (("CAold", 601.0), ("CAnew", 599.0)):
        shared.save_record(a_record(call_sid=call_sid))
        os.utime(tmp_path / "outcomes" / call_sid, (NOW - age_s, NOW - age_s))
    for call_sid, age_s in (("CAforgotten", 3601.0), ("CAremembered", 3599.0)):
        shared.publish_admission(call_sid, "<Response/>")
        assert shared.claim_stream(call_sid)
        shared.stream_ended(call_sid)
        for kind in ("admissions", "streams"):
            os.utime(tmp_path / kind / call_sid, (NOW - age_s, NOW - age_s))
    expired_ms, live_ms = int(NOW * 1000) - 1, int(NOW * 1000) + 1
    shared.claim_token("spent", expired_ms)
    shared.claim_token("live", live_ms)
    assert shared.sweep() == 4
    assert sorted(p.name for p in (tmp_path / "outcomes").iterdir()) == ["CAnew"]
    assert sorted(p.name for p in (tmp_path / "admissions").iterdir()) == ["CAremembered"]
    assert sorted(p.name for p in (tmp_path / "streams").iterdir()) == ["CAremembered"]
    assert [p.name for p in (tmp_path / "tokens").iterdir()] == [f"{live_ms}-live"]


def test_a_live_calls_marker_is_never_swept(tmp_path: Path) -> None:
    clock = [NOW]
    running_it = SharedDir(tmp_path, clock=lambda: clock[0])
    other = SharedDir(tmp_path, clock=lambda: clock[0])
    assert running_it.claim_stream("CAlong")
    for _ in range(5):  # a five-hour call; every process sweeps every minute
        clock[0] += 3600
        running_it.sweep()
        assert other.sweep() == 0
    assert not other.claim_stream("CAlong")
    running_it.stream_ended("CAlong")
    clock[0] += 3601
    assert other.sweep() == 1
    assert other.claim_stream("CAlong"), "forgotten an hour after it ended"


def test_sweep_keeps_at_most_the_newest_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(boxstate, "MAX_SHARED_RECORDS", 3)
    shared = SharedDir(tmp_path, clock=lambda: NOW)
    for index in range(5):
        shared.save_record(a_record(call_sid=f"CA{index}"))
        os.utime(tmp_path / "outcomes" / f"CA{index}", (NOW - 10 + index, NOW - 10 + index))
    assert shared.sweep() == 2
    assert sorted(p.name for p in (tmp_path / "outcomes").iterdir()) == ["CA2", "CA3", "CA4"]


def test_a_broken_directory_never_fails_a_call_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = SharedDir(tmp_path / "shared")
    shutil.rmtree(tmp_path / "shared")
    with caplog.at_level(logging.WARNING, logger="voicebridge"):
        shared.save_record(a_record())
        assert shared.load_record(a_record().call_sid) is None
        # Fails open: the per-process checks of StreamTokens and the registry still hold.
        assert shared.claim_token("nonce", 1_800_000_060_000)
        assert shared.claim_stream("CA1")
        assert shared.publish_admission("CA1", "<Response/>") is None
        assert shared.load_admission("CA1") is None
        assert shared.sweep() == 0
    failures = [r for r in caplog.records if record_fields(r).get("EVENT") == "shared-dir-failed"]
    assert len(failures) == 1
    assert shared.failures >= 4
    # Once it works again, the next failure is logged again.
    SharedDir(tmp_path / "shared")
    shared.save_record(a_record())
    assert shared.load_record(a_record().call_sid) == a_record()
