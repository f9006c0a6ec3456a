"""The run report: run_dir/report.html with PNG plots, built from metrics.jsonl.

The HTML is self-contained (plots inlined as base64 PNG; the same PNGs are also written next
to it for reuse in slides or docs). It states the scenario, the headline numbers, four plots
(accuracy against time and against bytes sent, ε against time, session outcomes per peer), a
table against the centralized and standalone baselines (without DP, and with DP at the same ε
when the run used DP), and dropped messages by reason.

The report reads only counters and scores from metrics.jsonl; it never sees model data. Every
string from the run (peer ids, drop reasons, scenario values) is HTML-escaped. The broker
password is redacted by `scenario_summary`.

The parts: the headline numbers and the baseline table (sim.report_summary), the plots
(sim.report_plots) and the HTML page (sim.report_html); this module writes the files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peer.files import atomic_write_bytes
from sim.metrics import read_metrics_file
from sim.report_html import render_html
from sim.report_plots import PLOT_FILES, build_plots, png_bytes
from sim.report_summary import summarize
from sim.scenario import Scenario

REPORT_FILE = "report.html"


def _atomic_write(path: Path, data: bytes) -> None:
    # Reports and plots are for sharing: world-readable, written like every other file.
    atomic_write_bytes(path, data, mode=0o644)


def write_report(
    run_dir: Path,
    scenario: Scenario,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    audit: Mapping[str, Any] | None = None,
) -> Path:
    """Read run_dir/metrics.jsonl, write the PNG plots and report.html; return the HTML path.
    ``audit``: a privacy audit's figures (sim.audit_card), shown as a card and a section."""
    run_dir = Path(run_dir)
    baselines = baselines or {}
    metrics = read_metrics_file(run_dir)
    summary = summarize(metrics.rows, metrics.skipped_lines)
    images = {key: png_bytes(fig) for key, fig in build_plots(metrics.rows, baselines,
                                                               scenario).items()}
    for key, data in images.items():
        _atomic_write(run_dir / PLOT_FILES[key], data)
    path = run_dir / REPORT_FILE
    _atomic_write(path, render_html(scenario, summary, baselines, images, audit
                                    ).encode("utf-8"))
    return path
