"""The run's headline numbers: `RunSummary` from metrics.jsonl rows, the table against the
baselines, and the plain-text summary printed at the end of a `murmur-sim` run.

Only counters and scores are read; no model data. The formatting helpers here (percentages,
byte counts, baseline labels and rows) are shared with the HTML report (sim.report_html).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sim.metrics import MetricsRow, last_row_per_peer, row_event


@dataclass(frozen=True)
class RunSummary:
    """Headline numbers of a run, from each peer's last metrics row.

    sessions_aborted counts sessions that failed after their group was fixed;
    sessions_not_formed counts invitations that never became a session (nobody accepted in
    time, all declined, yielded). Both are summed over peers, so one failed session counts once
    per member that saw it. `events` counts rows by event, naming the two apart likewise.
    """

    peers: int
    duration_s: float
    mean_accuracy: float | None
    min_accuracy: float | None
    max_accuracy: float | None
    accuracy_source: str  # "test set" or "local hold-out"
    sessions_done: int
    sessions_aborted: int
    max_epsilon: float | None
    mean_bytes_sent: float
    drops: dict[str, int]
    events: dict[str, int]
    skipped_lines: int = 0
    sessions_not_formed: int = 0
    # The largest peak resident memory any peer reported (MiB; None: none did). In-process
    # runs share one process, so there it is the whole simulation's.
    max_peak_rss_mb: float | None = None


def _final_accuracy(row: MetricsRow) -> tuple[float | None, str]:
    test = row.extra.get("test_accuracy") if row.extra else None
    if isinstance(test, int | float) and not isinstance(test, bool) and 0 <= test <= 1:
        return float(test), "test set"
    return row.accuracy, "local hold-out"


def _last_accuracy_per_peer(rows: Sequence[MetricsRow]) -> dict[str, tuple[float, str]]:
    """Each peer's most recent accuracy (a final row may carry none, e.g. a churn 'leave')."""
    found: dict[str, tuple[float, str]] = {}
    for row in sorted(rows, key=lambda r: r.t):
        value, source = _final_accuracy(row)
        if value is not None:
            found[row.peer] = (value, source)
    return found


def summarize(rows: Sequence[MetricsRow], skipped_lines: int = 0) -> RunSummary:
    """Aggregate the final state of every peer (sessions summed, ε max, accuracy mean)."""
    finals = last_row_per_peer(list(rows))
    accuracies = _last_accuracy_per_peer(rows)
    values = [v for v, _ in accuracies.values()]
    sources = {s for _, s in accuracies.values()}
    drops: dict[str, int] = {}
    for row in finals.values():
        for reason, count in row.drops.items():
            drops[reason] = drops.get(reason, 0) + count
    epsilons = [r.epsilon for r in finals.values() if r.epsilon is not None]
    peaks = [float(v) for r in rows for v in [r.extra.get("peak_rss_mb")]
             if isinstance(v, int | float) and not isinstance(v, bool)]
    return RunSummary(
        peers=len(finals),
        duration_s=max((r.t for r in rows), default=0.0),
        mean_accuracy=float(np.mean(values)) if values else None,
        min_accuracy=min(values) if values else None,
        max_accuracy=max(values) if values else None,
        accuracy_source="test set" if sources == {"test set"} else "local hold-out",
        sessions_done=sum(r.sessions_done for r in finals.values()),
        sessions_aborted=sum(r.sessions_aborted for r in finals.values()),
        sessions_not_formed=sum(r.sessions_not_formed for r in finals.values()),
        max_epsilon=max(epsilons) if epsilons else None,
        mean_bytes_sent=float(np.mean([r.bytes_sent for r in finals.values()])) if finals else 0.0,
        drops=dict(sorted(drops.items(), key=lambda kv: (-kv[1], kv[0]))),
        events=dict(Counter(row_event(row.event, row.extra) for row in rows).most_common()),
        skipped_lines=skipped_lines,
        max_peak_rss_mb=max(peaks) if peaks else None,
    )


# -- formatting ----------------------------------------------------------------------------------


def format_percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal ("83.4%"); a dash for no value."""
    return "–" if value is None else f"{value:.1%}"


def format_bytes(value: float) -> str:
    """A byte count in the largest unit it reaches ("1.2 MB")."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def baseline_label(name: str, result: Mapping[str, Any]) -> str:
    """A baseline's display label ("each peer alone, DP eps=3"); its key if it has none."""
    label = result.get("label")
    return label if isinstance(label, str) and label else name


def _ordered(baselines: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """Known baselines first, the no-DP one before its DP twin; any others after, as given."""
    known = ("centralized", "centralized_dp", "standalone", "standalone_dp")
    first = [(k, baselines[k]) for k in known if k in baselines]
    return first + [(k, v) for k, v in baselines.items() if k not in known]


def baseline_rows(
    summary: RunSummary, baselines: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, str, str, str, str]]:
    """(method, mean, min, max, notes) rows: this run first, then the baselines in order."""
    rows = [(
        "Murmur (this run)",
        format_percent(summary.mean_accuracy),
        format_percent(summary.min_accuracy),
        format_percent(summary.max_accuracy),
        f"mean over {summary.peers} peers, {summary.accuracy_source}",
    )]
    for name, result in _ordered(baselines):
        accuracy = result.get("accuracy")
        description = str(result.get("description", ""))
        rows.append((
            baseline_label(name, result),
            format_percent(accuracy if isinstance(accuracy, int | float) else None),
            format_percent(result.get("accuracy_min")),
            format_percent(result.get("accuracy_max")),
            f"{description} [result.json: {name}]" if description else f"[result.json: {name}]",
        ))
    return rows


def terminal_summary(
    summary: RunSummary, baselines: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """A short plain-text table for the end of a `murmur-sim` run."""
    rows = baseline_rows(summary, baselines or {})
    width = max(20, *(len(row[0]) for row in rows))
    lines = [f"{'method':<{width}} {'mean acc':>9} {'min':>7} {'max':>7}"]
    for name, mean, low, high, _note in rows:
        lines.append(f"{name:<{width}} {mean:>9} {low:>7} {high:>7}")
    lines.append(
        f"sessions: {summary.sessions_done} completed, {summary.sessions_aborted} aborted, "
        f"{summary.sessions_not_formed} invitations not formed; "
        f"max ε {'–' if summary.max_epsilon is None else f'{summary.max_epsilon:.2f}'}; "
        f"{format_bytes(summary.mean_bytes_sent)} sent per peer; "
        f"drops: {sum(summary.drops.values())}"
        + ("" if summary.max_peak_rss_mb is None else
           f"; peak memory {summary.max_peak_rss_mb:.0f} MiB (largest process)")
    )
    seconds = [v.get("seconds") for v in (baselines or {}).values()]
    if seconds and all(isinstance(t, int | float) for t in seconds):
        lines.append(f"baselines: trained in {sum(seconds):.1f} s (test set)")
    return "\n".join(lines)


def _figure(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) and not isinstance(value, bool) \
        else "–"


def audit_figures(audit: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(figure, label) pairs of a privacy audit (sim.audit_card.ScenarioAudit.to_dict), for
    the terminal line and the report's card."""
    return [
        (_figure(audit.get("epsilon_lower_bound")), "audit: lower bound on ε"),
        (_figure(audit.get("epsilon_claimed")), "audit: claimed ε (ledger)"),
        (_figure(audit.get("epsilon_ceiling")), "audit: the method's ceiling"),
        (_figure(audit.get("weakened_lower_bound")),
         f"audit: bound with noise ×{audit.get('weakened_noise_scale')}"),
    ]


def audit_line(audit: Mapping[str, Any]) -> str:
    """One terminal line for a privacy audit's result."""
    if audit.get("error"):
        return f"audit: not run ({audit['error']})"
    verdict = "passed" if audit.get("passed") else "FAILED"
    figures = ", ".join(f"{label.removeprefix('audit: ')} {value}"
                        for value, label in audit_figures(audit))
    return f"audit ({audit.get('m')} canaries, {audit.get('confidence')}): {verdict}; {figures}"
