"""metrics.jsonl writing/reading and the HTML report, from synthetic metrics."""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from sim.metrics import (
    METRICS_FILE,
    MetricsError,
    MetricsRow,
    MetricsWriter,
    last_row_per_peer,
    read_metrics,
    read_metrics_file,
)
from sim.report import REPORT_FILE, write_report
from sim.report_plots import PLOT_FILES, mean_curve
from sim.report_summary import summarize, terminal_summary
from sim.scenario import Scenario

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _synthetic_run(run_dir: Path, peers: int = 4, rounds: int = 12, seed: int = 0) -> None:
    """Plausible learning curves: accuracy rising from chance, ε growing like sqrt(steps)."""
    rng = np.random.default_rng(seed)
    with MetricsWriter(run_dir) as writer:
        for p in range(peers):
            writer.record(f"peer-{p}", "start", t=0.1 * p)
        for r in range(1, rounds + 1):
            for p in range(peers):
                name = f"peer-{p}"
                accuracy = min(0.97, 0.1 + 0.85 * (1 - np.exp(-r / 3)) + rng.normal(0, 0.02))
                writer.record(
                    name,
                    "round",
                    t=5.0 * r + p,
                    round=r,
                    sessions_done=r - (p % 2),
                    sessions_aborted=p % 2 + r // 6,
                    accuracy=float(max(0.0, accuracy)),
                    epsilon=float(0.8 * np.sqrt(r)),
                    bytes_sent=r * 180_000 + p * 1000,
                    bytes_received=r * 170_000,
                    drops={"bad_signature": p, "replay": r // 4} if p else {},
                )
        writer.record("peer-0", "stop", t=5.0 * rounds + 10, sessions_done=rounds,
                      sessions_aborted=2, accuracy=0.95, epsilon=2.9, bytes_sent=rounds * 180_000,
                      extra={"test_accuracy": 0.94})


BASELINES = {
    "centralized": {"accuracy": 0.972, "description": "all training data pooled"},
    "standalone": {"accuracy": 0.81, "accuracy_min": 0.7, "accuracy_max": 0.9,
                   "description": "each peer alone on its shard"},
}


def test_writer_and_reader_round_trip(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as writer:
        written = writer.record("a", "round", t=1.5, accuracy=0.5, epsilon=0.3,
                                drops={"bad_signature": 1}, round=3)
        writer.record("b", "status", t=2.0)
    rows = read_metrics(tmp_path / METRICS_FILE)
    assert rows[0] == written
    assert rows[1].accuracy is None and rows[1].drops == {}
    line = (tmp_path / METRICS_FILE).read_text().splitlines()[0]
    assert json.loads(line)["drops"] == {"bad_signature": 1}
    # Reopening appends instead of truncating.
    with MetricsWriter(tmp_path) as writer:
        writer.record("a", "stop", t=3.0)
    assert [r.event for r in read_metrics(tmp_path)] == ["round", "status", "stop"]


def test_record_status_maps_a_peer_status_snapshot(tmp_path: Path) -> None:
    from types import SimpleNamespace

    status = SimpleNamespace(
        peer_id="p1", connected=True, round=4, accuracy=np.float32(0.75), epsilon=float("inf"),
        budget_exhausted=False, sessions_done=3, sessions_aborted=1,
        aborts_by_reason={"timeout": 1}, merges_applied=3, merges_rejected={}, bytes_sent=10,
        bytes_received=20, messages_sent=5, messages_received=6, reconnects=0,
        drops={"replay": 2}, peers_live=7, in_session=False,
    )
    with MetricsWriter(tmp_path) as writer:
        row = writer.record_status(status, "round", t=3.0, test_accuracy=0.7)
    assert read_metrics(tmp_path) == [row]
    assert (row.peer, row.round, row.sessions_done, row.drops) == ("p1", 4, 3, {"replay": 2})
    assert row.accuracy == pytest.approx(0.75) and row.epsilon is None
    assert row.extra["epsilon_unbounded"] is True
    assert row.extra["aborts_by_reason"] == {"timeout": 1} and row.extra["peers_live"] == 7
    assert row.extra["test_accuracy"] == 0.7


def test_reader_skips_and_counts_malformed_lines(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as writer:
        writer.record("a", "round", t=1.0, accuracy=0.4)
    with open(tmp_path / METRICS_FILE, "a") as handle:
        handle.write('{"t": -1, "peer": "a", "event": "x"}\n')  # negative time
        handle.write('{"t": 1, "peer": "a", "event": "x", "accuracy": 1.5}\n')
        handle.write('{"t": 1, "peer": "a", "event": "x", "weights": [1, 2]}\n')  # unknown
        handle.write('["not", "an", "object"]\n')
        handle.write('{"t": 2, "peer": "a", "event": "rou')  # partial line of a killed run
    result = read_metrics_file(tmp_path)
    assert len(result.rows) == 1 and result.skipped_lines == 5


@pytest.mark.parametrize(
    "bad",
    [
        {"t": float("nan")},
        {"peer": ""},
        {"sessions_done": -1},
        {"bytes_sent": 1.5},
        {"epsilon": float("inf")},
        {"drops": {"x": -2}},
        {"sessions_aborted": True},
    ],
)
def test_rows_reject_bad_values(bad: dict) -> None:
    fields = {"t": 1.0, "peer": "a", "event": "round", **bad}
    with pytest.raises(MetricsError):
        MetricsRow(**fields)


def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path)
    second = MetricsWriter(tmp_path, start_time=writer.start_time)  # as a child process would

    def burst(w: MetricsWriter, peer: str) -> None:
        for i in range(300):
            w.record(peer, "status", drops={f"reason-{j}": i for j in range(20)})

    threads = [threading.Thread(target=burst, args=(w, f"p{i}"))
               for i, w in enumerate([writer, writer, second])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    writer.close()
    second.close()
    result = read_metrics_file(tmp_path)
    assert result.skipped_lines == 0 and len(result.rows) == 900
    with pytest.raises(RuntimeError):
        writer.record("p0", "status")


def test_last_row_per_peer_and_summary(tmp_path: Path) -> None:
    _synthetic_run(tmp_path)
    rows = read_metrics(tmp_path)
    finals = last_row_per_peer(rows)
    assert list(finals) == ["peer-0", "peer-1", "peer-2", "peer-3"]
    assert finals["peer-0"].event == "stop"
    summary = summarize(rows)
    assert summary.peers == 4
    assert summary.mean_accuracy is not None and 0.85 < summary.mean_accuracy <= 0.97
    # peer-0 has a test-set accuracy, the others only their hold-out: reported as hold-out.
    assert summary.accuracy_source == "local hold-out"
    assert summary.drops["bad_signature"] == 1 + 2 + 3
    assert summary.max_epsilon == pytest.approx(2.9)  # peer-0's final row
    table = terminal_summary(summary, BASELINES)
    assert "centralized" in table and "97.2%" in table


def test_mean_curve_counts_peers_from_their_first_measurement() -> None:
    series = {
        "a": (np.array([0.0, 10.0]), np.array([0.2, 0.8])),
        "b": (np.array([5.0]), np.array([0.6])),
    }
    grid, mean = mean_curve(series, points=11)
    assert mean[0] == pytest.approx(0.2)  # only a has reported at t = 0
    assert mean[5] == pytest.approx(0.4)  # t = 5: a at 0.2, b at 0.6
    assert mean[-1] == pytest.approx(0.7)
    assert grid[0] == 0.0 and grid[-1] == 10.0


def test_write_report_produces_self_contained_html_and_pngs(tmp_path: Path) -> None:
    _synthetic_run(tmp_path)
    scenario = Scenario(peers=4, churn_rate=0.5, hostile_peers=("garbage",))
    path = write_report(tmp_path, scenario, BASELINES)
    assert path == tmp_path / REPORT_FILE
    text = path.read_text()
    for filename in PLOT_FILES.values():
        data = (tmp_path / filename).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    inlined = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(inlined) == len(PLOT_FILES)
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in inlined)
    assert 'src="http' not in text and "<script" not in text  # nothing fetched from anywhere
    for expected in ("centralized", "standalone", "Murmur (this run)",
                     f"Dirichlet α = {scenario.alpha:g}", "bad_signature", "churn", "garbage",
                     "target ε = 3"):
        assert expected in text
    assert "points above training alone" in text
    assert "Events recorded" in text and "session" in text
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes left no temp files


def test_report_escapes_run_strings_and_handles_an_empty_run(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as writer:
        writer.record("evil", "status", t=1.0, drops={"<script>alert(1)</script>": 1})
    text = write_report(tmp_path, Scenario(dp=False), {}).read_text()
    assert "<script>alert" not in text and "&lt;script&gt;" in text
    assert "No peer reported an accuracy" in text

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / METRICS_FILE).write_text("")
    text = write_report(empty, Scenario(), BASELINES).read_text()
    assert "No peer reported an accuracy" in text


BASELINES_DP = {
    "centralized": {**BASELINES["centralized"], "label": "centralized, no DP", "seconds": 1.0},
    "standalone": {**BASELINES["standalone"], "label": "each peer alone, no DP", "seconds": 1.0},
    "centralized_dp": {"accuracy": 0.903, "epsilon": 2.99, "target_epsilon": 3.0,
                       "label": "centralized, DP eps=3 (Murmur DP-SGD, pooled data)",
                       "description": "pooled, Murmur DP-SGD", "seconds": 2.5},
    "standalone_dp": {"accuracy": 0.412, "accuracy_min": 0.3, "accuracy_max": 0.55,
                      "epsilon": 3.0, "target_epsilon": 3.0,
                      "label": "each peer alone, DP eps=3",
                      "description": "each peer alone, DP", "seconds": 4.0},
}


def test_report_and_terminal_show_dp_baselines_beside_the_no_dp_ones(tmp_path: Path) -> None:
    _synthetic_run(tmp_path)
    rows = read_metrics(tmp_path / METRICS_FILE)
    table = terminal_summary(summarize(rows), BASELINES_DP)
    lines = table.splitlines()
    labels = ["centralized, no DP", "centralized, DP eps=3 (Murmur DP-SGD, pooled data)",
              "each peer alone, no DP", "each peer alone, DP eps=3"]
    starts = [next(i for i, line in enumerate(lines) if line.startswith(label))
              for label in labels]
    assert starts == sorted(starts)  # each no-DP row right before its DP twin
    dp_row = lines[starts[3]].split()
    assert dp_row[-3:] == ["41.2%", "30.0%", "55.0%"]
    assert "90.3%" in lines[starts[1]]
    assert "baselines: trained in 8.5 s" in table

    text = write_report(tmp_path, Scenario(peers=4), BASELINES_DP).read_text()
    for label in labels:
        assert f"<td>{html.escape(label)}</td>" in text
    for key in BASELINES_DP:
        assert f"[result.json: {key}]" in text
    assert "With the same DP, each peer alone reaches 41.2%" in text
    assert "all data pooled at ε = 3 reaches 90.3%" in text
    assert "what privacy costs" in text and "what gossip buys back" in text
    # Without DP baselines the DP sentences and the reading note are absent.
    plain = write_report(tmp_path, Scenario(peers=4), BASELINES).read_text()
    assert "With the same DP" not in plain and "what gossip buys back" not in plain


def test_baselines_on_digits_beat_chance_and_centralized_beats_standalone() -> None:
    from dataclasses import dataclass

    import torch
    from sklearn.datasets import load_digits

    from sim.baselines import compute_baselines
    from sim.baselines_plain import train_steps
    from sim.partition import dirichlet

    @dataclass
    class Data:  # the fields of peer.training.data.Dataset that the baselines use
        x: np.ndarray
        y: np.ndarray
        num_classes: int

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train = Data(x[order[:1400]], y[order[:1400]], 10)
    test = Data(x[order[1400:]], y[order[1400:]], 10)
    partitions = dirichlet(train.y, 6, 0.3, np.random.default_rng(1), min_size=20)
    scenario = Scenario(peers=6, rounds=4, local_steps=10, batch_size=32, seed=3)

    result = compute_baselines(scenario, train, test, partitions)
    central, alone = result["centralized"], result["standalone"]
    assert central["steps"] == 6 * 40 and alone["steps"] == 40
    assert central["model"] == "mlp"
    assert central["accuracy"] > 0.8  # pooled data learns digits well
    assert 0.1 < alone["accuracy"] < central["accuracy"]  # skewed shards alone do worse
    assert len(alone["per_peer"]) == 6
    assert alone["accuracy_min"] <= alone["accuracy"] <= alone["accuracy_max"]
    # Same seed, same model: baselines are reproducible for a scenario.
    first, second = (
        train_steps("mlp", train.x, train.y, 10, steps=5, batch_size=16, seed=9) for _ in range(2)
    )
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)

    by_epochs = compute_baselines(scenario, train, test, partitions, epochs_equivalent=1.0,
                                  dp=False)
    assert by_epochs["centralized"]["steps"] == int(np.ceil(1400 / 32))
    assert by_epochs["centralized"]["epochs"] == pytest.approx(1.0, abs=0.05)


def _not_formed_run(run_dir: Path) -> None:
    """Two peers whose invitations mostly never became sessions, written the way the engines do
    it: from a PeerStatus snapshot and the node's session_aborted event (formed or not)."""
    from peer.network.counters import PeerStatus
    from peer.network.node import PeerEvent
    from sim.carry import event_extra

    def aborted(peer: str, formed: bool) -> PeerEvent:
        reason = "timeout" if formed else "not enough acceptors"
        return PeerEvent("session_aborted", peer, 0.0, {"formed": formed, "reason": reason})

    with MetricsWriter(run_dir) as writer:
        for i in range(3):  # peer-a: three invitations nobody accepted in time
            status = PeerStatus(peer_id="peer-a", sessions_done=1, sessions_not_formed=i + 1)
            writer.record_status(status, "session_aborted", t=1.0 + i,
                                 **event_extra(aborted("peer-a", formed=False)))
        status = PeerStatus(peer_id="peer-b", sessions_done=2, sessions_aborted=1,
                            sessions_not_formed=1)
        writer.record_status(status, "session_aborted", t=2.5,
                             **event_extra(aborted("peer-b", formed=True)))
        writer.record_status(status, "session_aborted", t=3.5,
                             **event_extra(aborted("peer-b", formed=False)))


def test_invitations_not_formed_are_counted_apart_from_aborted_sessions(tmp_path: Path) -> None:
    _not_formed_run(tmp_path)
    rows = read_metrics(tmp_path)
    assert [r.event for r in rows] == ["session_not_formed"] * 3 + [
        "session_aborted", "session_not_formed"]
    assert [r.extra["formed"] for r in rows] == [False, False, False, True, False]
    assert json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[0])[
        "sessions_not_formed"] == 1

    summary = summarize(rows)
    assert (summary.sessions_done, summary.sessions_aborted, summary.sessions_not_formed) == (
        3, 1, 4)
    # The events table agrees with the counters: one abort row, four not-formed rows.
    assert summary.events == {"session_not_formed": 4, "session_aborted": 1}
    saved = json.loads(json.dumps(dataclasses.asdict(summary)))  # what result.json holds
    assert saved["sessions_aborted"] == 1 and saved["sessions_not_formed"] == 4

    line = terminal_summary(summary).splitlines()[-1]
    assert line.startswith("sessions: 3 completed, 1 aborted, 4 invitations not formed;")

    text = write_report(tmp_path, Scenario(peers=2, dp=False), {}).read_text()
    cards = {label: value for value, label
             in re.findall(r'<div class="card"><b>([^<]*)</b><span>([^<]*)</span>', text)}
    assert cards["sessions aborted"] == "1" and cards["invitations not formed"] == "4"
    assert cards["sessions completed"] == "3"
    assert "<tr><td>session_not_formed</td><td>4</td></tr>" in text
    assert "<tr><td>session_aborted</td><td>1</td></tr>" in text
    assert "invitations that never became a session" in text


def test_legacy_rows_without_the_new_field_still_read(tmp_path: Path) -> None:
    # A log from before sessions_not_formed existed: the field reads as 0, and a session_aborted
    # row that says formed=false is still counted as an invitation that never formed.
    (tmp_path / METRICS_FILE).write_text(
        '{"t":1,"peer":"a","event":"session_aborted","sessions_done":2,"sessions_aborted":0,'
        '"extra":{"formed":false,"reason":"timeout"}}\n')
    rows = read_metrics(tmp_path)
    assert rows[0].sessions_not_formed == 0 and rows[0].event == "session_aborted"
    summary = summarize(rows)
    assert summary.sessions_aborted == 0 and summary.events == {"session_not_formed": 1}


def test_sessions_plot_draws_not_formed_invitations_as_a_third_series() -> None:
    from sim.report_plots import build_plots

    rows = [MetricsRow(t=1.0, peer="p1", event="stop", sessions_done=4, sessions_aborted=1,
                       sessions_not_formed=6)]
    figure = build_plots(rows, {}, Scenario(dp=False))["sessions"]
    ax = figure.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["sessions completed", "sessions aborted", "invitations not formed"]
    heights = [[bar.get_height() for bar in container] for container in ax.containers]
    bottoms = [[bar.get_y() for bar in container] for container in ax.containers]
    assert heights == [[4], [1], [6]] and bottoms == [[0], [4], [5]]
    assert ax.get_ylim()[1] >= 11


def test_report_and_summary_show_the_largest_peak_memory(tmp_path: Path) -> None:
    """Peers report their process's peak RSS (PeerStatus.peak_rss_mb, kept in a row's extra);
    the summary, the terminal table and the HTML report show the largest."""
    from peer.network.counters import PeerStatus

    with MetricsWriter(tmp_path) as writer:
        for name, peak in (("p0", 281.5), ("p1", 312.25), ("p2", None)):
            writer.record_status(PeerStatus(peer_id=name, peak_rss_mb=peak), "round", t=1.0)
    rows = read_metrics(tmp_path)
    assert [r.extra.get("peak_rss_mb") for r in rows] == [281.5, 312.25, None]
    summary = summarize(rows)
    assert summary.max_peak_rss_mb == 312.25
    assert "peak memory 312 MiB (largest process)" in terminal_summary(summary)
    text = write_report(tmp_path, Scenario(peers=3), {}).read_text()
    assert "<b>312 MiB</b><span>peak memory (largest process)</span>" in text
    assert summarize([r for r in rows if r.peer == "p2"]).max_peak_rss_mb is None
