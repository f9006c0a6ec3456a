"""The pure parts of bench/scale_bench.py (issue 14): its row builder, the broker rates, the
announcement tally around a real (never connected) peer, and the deep-size estimate.

The bench is a script, not a package, so it is loaded from its file.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from crypto.admission import AdmissionKey
from crypto.identity import Identity
from peer.errors import DroppedError
from peer.network.transport import Incoming
from protocol.topics import announce_topic, direct_topic

BENCH = Path(__file__).resolve().parent.parent / "bench" / "scale_bench.py"


@pytest.fixture(scope="module")
def sb() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_scale_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _snap(sb: ModuleType, t: float, **values: object) -> dict:
    return {**sb.EMPTY_SNAPSHOT, "time": t, **values}


def test_row_divides_window_deltas_by_sessions_peers_and_minutes(sb):
    startup = [_snap(sb, 0.0, announce_bytes=300, announce_messages=1),
               _snap(sb, 0.0, announce_bytes=900, announce_messages=3)]
    before = [_snap(sb, 10.0, bytes_sent=1_000, bytes_received=2_000, sessions_done=1,
                    announce_bytes=300, aborts_by_reason={"yielded": 1}),
              _snap(sb, 10.0, bytes_sent=5_000, sessions_done=2, announce_bytes=900)]
    after = [_snap(sb, 40.0, bytes_sent=7_000, bytes_received=14_000, sessions_done=3,
                   announce_bytes=1_500, view_entries=1, peers_live=1,
                   aborts_by_reason={"yielded": 3, "timeout_accepted": 1}),
             _snap(sb, 40.0, bytes_sent=11_000, bytes_received=6_000, sessions_done=4,
                   announce_bytes=1_500, view_entries=1, peers_live=1)]
    row = sb.scale_row({"peers": 2, "mode": "in_process"}, startup, before, after,
                       cpu_s=0.2, view_state_bytes=123.0)
    # 4 sessions in a 30 s window over 2 peers: 4 per peer per minute.
    assert row["window_s"] == 30.0
    assert row["sessions_per_min_per_peer"] == pytest.approx(4.0)
    assert row["bytes_sent_per_session"] == pytest.approx(12_000 / 4)
    assert row["bytes_received_per_session"] == pytest.approx(18_000 / 4)
    assert row["announce_bytes_received_per_peer_per_min"] == pytest.approx(1_800 / 2 / 0.5)
    assert row["announce_share_of_received_pct"] == pytest.approx(100 * 1_800 / 18_000)
    assert row["startup_announce_bytes_received_per_peer"] == 600
    assert row["cpu_ms_per_session"] == pytest.approx(50.0)
    assert row["cpu_pct_per_peer"] == pytest.approx(100 * 0.2 / 2 / 30)
    assert row["view_state_bytes_per_peer"] == 123.0
    assert row["abort_reasons"] == "timeout_accepted:1,yielded:2"
    assert row["peers"] == 2 and row["mode"] == "in_process"


def test_row_without_sessions_reports_nan_per_session(sb):
    snaps = [_snap(sb, 0.0)]
    row = sb.scale_row({}, snaps, snaps, [_snap(sb, 60.0, bytes_sent=10)], 1.0, 0.0)
    assert math.isnan(row["bytes_sent_per_session"])
    assert math.isnan(row["cpu_ms_per_session"])
    assert row["sessions_per_min_per_peer"] == 0.0


def test_row_needs_one_snapshot_per_peer_in_every_phase(sb):
    with pytest.raises(ValueError, match="one snapshot per peer"):
        sb.scale_row({}, [], [_snap(sb, 0.0)], [_snap(sb, 1.0)], 0.0, 0.0)


def test_growth_skips_saturated_rows(sb):
    rows = [{"mode": "in_process", "peers": 8, "x": 2.0},
            {"mode": "in_process", "peers": 128, "x": 3.0},
            {"mode": "in_process", "peers": 256, "x": 100.0, "host_saturated": True},
            {"mode": "processes", "peers": 16, "x": 50.0}]
    assert sb.growth(rows, "x") == pytest.approx(1.5)
    assert math.isnan(sb.growth(rows, "x", mode="processes"))


def test_broker_rates_take_out_our_own_sys_deliveries(sb):
    topics = sb.SYS_TOPICS
    before = {"values": {topics[0]: (100.0, 1.0), topics[1]: (50.0, 1.0),
                         topics[2]: (1_000.0, 1.0)}, "received": 3, "time": 2.0}
    after = {"values": {topics[0]: (1_100.0, 11.0), topics[1]: (250.0, 9.0),
                        topics[2]: (11_000.0, 11.0)}, "received": 23, "time": 12.0}
    rates = sb.broker_rates(before, after)
    assert rates["broker_publish_out_per_s"] == pytest.approx(100.0 - 2.0)
    assert rates["broker_publish_in_per_s"] == pytest.approx(20.0)
    assert rates["broker_bytes_out_per_s"] == pytest.approx(1_000.0)


def test_tally_counts_announce_topic_bytes_and_keeps_the_checks(sb):
    admission = AdmissionKey.generate(sb.NETWORK)
    ident = Identity.generate("p000")
    cert = admission.issue(ident.public, valid_for_s=600, now=time.time())
    bench_peer = sb.build_bench_peer(ident, cert, admission.public_key, "mqtt://127.0.0.1:1",
                                     param_count=100, seed=0)
    admit = bench_peer.peer.inbound.admit
    for topic in (announce_topic(sb.NETWORK, "p001"), direct_topic(sb.NETWORK, "p001", "p000")):
        with pytest.raises(DroppedError):  # junk is still refused by the node's own checks
            admit(Incoming(topic, b"\x00" * 40, retain=False), time.time())
    assert (bench_peer.tally.messages, bench_peer.tally.bytes) == (1, 40)
    assert bench_peer.indices.size == 25 and bench_peer.values.size == 25


def test_deep_size_grows_with_the_view_content(sb):
    small = sb.approx_deep_size({"a": b"x" * 10})
    large = sb.approx_deep_size({"a": b"x" * 10, "b": [b"y" * 1_000, "z" * 500]})
    assert large - small >= 1_500
    shared = b"s" * 1_000
    assert sb.approx_deep_size([shared, shared]) < sb.approx_deep_size([shared, b"t" * 1_000])
