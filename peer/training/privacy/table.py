"""Epsilon tables: the accountant's exact figures, computed in a child process, kept on disk.

A ledger's epsilon is a deterministic function of its events: segments ``(sigma, q, n)``
composed at ``delta`` by a named accountant. Every figure a ledger asks for is
``epsilon(prefix + [(sigma, q, n)])`` where only ``n`` of the last segment grows, so a
:class:`TableKey` (accountant, delta, prefix, sigma, q) and a step count ``n`` name it.

:class:`EpsilonTable` answers from ``state_dir/epsilon_table.json`` and, on a miss, runs
:mod:`.table_child` (a short-lived interpreter that imports the accountant's library, never
torch) for that count and the next :data:`CHUNK` counts at the same stride, then stores the
extended table atomically before the figure is used. Before a key's entries run out it runs
the next chunk in a background thread (:mod:`.table_prefetch`), so a round waits for a child
only on a real miss. Properties (docs/privacy.md, "epsilon tables"):

* A figure is the library's own, bit for bit: the child calls the same
  ``epsilon_of_segments`` an in-process ledger calls, and JSON round-trips doubles exactly.
* Nothing is interpolated or guessed: a count that is not an entry is computed; if the child
  fails, :class:`~.base.AccountingError` is raised and the caller's round does not start.
* Computing ahead changes when a figure is computed, never its value: a background chunk is
  the same request to the same child, checked and stored by the same code, and a figure is
  served only once it is stored for exactly its key and count.
* A figure also depends on what no key names: the accountant modules' constants (PLD's
  discretization interval, the neighbouring relation, Poisson sampling, RDP's orders) and the
  library versions. :func:`method_fingerprint` hashes those modules' source and the
  libraries' versions; a table made under another fingerprint is never used, and a child
  whose own fingerprint differs from the parent's refuses the request.
* A stored file that does not parse, breaks the table's invariants, fails its SHA-256 over
  the body (a partial or hand edit) or carries another fingerprint is logged, counted in
  :attr:`EpsilonTable.rebuilt_files` and recomputed (it is derived data). The digest is not a
  signature: whoever can write this file can write ``ledger.json`` beside it.

:class:`InProcessAccountant` is the other :class:`EpsilonSource`: the library in this process
(the default for a ledger with no table). What names a figure and what a stored table must
satisfy (:class:`TableKey`, the fingerprint, the digest) is in :mod:`.table_key`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path
from typing import Protocol

from peer.files import atomic_write_bytes
from peer.training.privacy import accountant as accountants
from peer.training.privacy.base import AccountingError, Segment
from peer.training.privacy.table_key import (
    TableKey,
    body_digest,
    method_fingerprint,
    number,
    sigma_key,
    valid_entries,
)
from peer.training.privacy.table_prefetch import (
    ChildJob,
    ChildProcess,
    chunk_counts,
    close_at_exit,
    prefetch_counts,
    run_child,
)

__all__ = [
    "CHILD_TIMEOUT_S", "CHUNK", "IN_PROCESS", "TABLE_FILE", "TABLE_FORMAT", "EpsilonSource",
    "EpsilonTable", "InProcessAccountant", "TableKey", "body_digest", "epsilon_source",
    "method_fingerprint",
]

TABLE_FILE = "epsilon_table.json"
#: 2: a ``method`` fingerprint and a ``sha256`` of the body (format 1 files are rebuilt).
TABLE_FORMAT = 2
#: Step counts computed per child run beyond the one asked for (the next rounds' counts).
CHUNK = 48
#: A child that takes longer than this has failed (a chunk takes seconds on a Pi-class CPU).
CHILD_TIMEOUT_S = 600.0

log = logging.getLogger(__name__)

class EpsilonSource(Protocol):
    """Where a ledger gets its accountant's figures from."""

    def epsilon_of_segments(self, segments: list[Segment], delta: float, accountant: str,
                            stride: int = 1) -> float: ...

    def sigma_for(self, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  accountant: str) -> float: ...


class InProcessAccountant:
    """The accountant's library in this process (imports it on first use)."""

    def epsilon_of_segments(self, segments: list[Segment], delta: float, accountant: str,
                            stride: int = 1) -> float:
        return accountants.epsilon_of_segments(segments, delta, accountant)

    def sigma_for(self, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  accountant: str) -> float:
        return accountants.sigma_for(target_epsilon, delta, sample_rate, steps, accountant)


IN_PROCESS = InProcessAccountant()


def epsilon_source(use_table: bool, state_dir: Path | str | None) -> EpsilonSource:
    """The ledgers' figures: ``state_dir``'s epsilon table when ``use_table`` (the library
    then never loads in this process), else the library in this process."""
    if not use_table or state_dir is None:
        return IN_PROCESS
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    return EpsilonTable(Path(state_dir) / TABLE_FILE)


class EpsilonTable:
    """The figures of one state directory's ledgers (see the module docstring).

    Thread-safe: the trainer's round thread and a status reader may ask at once. One lock
    guards the entries, the file write and the one child a table may run at a time; the
    child itself runs without the lock, so a reader of stored figures never waits for it.

    **Filled ahead of need.** After serving a count, if fewer than ``margin`` stored entries
    of that key lie past it (default ``chunk // 2``; 0 turns this off), a daemon thread runs
    the child for the next ``chunk + 1`` counts at the same stride while training goes on.
    The caller waits only when the very count it asks for is not stored: for the running
    child if it covers that count (or holds the one child slot), else for a child it starts
    itself. A background failure is logged and counted, and pauses asking ahead for its key
    until a foreground child for that key succeeds; the foreground path is unchanged by it
    (a correct figure or :class:`~.base.AccountingError`). :meth:`close` stops it all.

    Public read-outs (counters only grow; each is read without a lock):

    * :attr:`children_run`: child processes started, foreground and background.
    * :attr:`foreground_waits`: requests whose count was not stored when asked (the caller
      waited for a running child or for its own).
    * :attr:`foreground_children`: children started by a caller for its own miss.
    * :attr:`background_chunks`: background children whose figures were stored.
    * :attr:`background_failures`: background children that failed, or whose thread did not
      start (not counting a close).
    * :attr:`rebuilt_files`: stored files found unusable and recomputed.
    * :attr:`child_running`: whether a child (either kind) is running now.
    """

    def __init__(self, path: Path, chunk: int = CHUNK, margin: int | None = None) -> None:
        self.path = Path(path)
        self.chunk = chunk
        #: Ask ahead when fewer entries than this lie past the count just served (0: never).
        self.margin = chunk // 2 if margin is None else margin
        self.children_run = 0
        self.foreground_waits = 0
        self.foreground_children = 0
        self.background_chunks = 0
        self.background_failures = 0
        self.rebuilt_files = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._epsilons: dict[str, dict[int, float]] = {}
        self._sigmas: dict[str, float] = {}
        self._running: ChildJob | None = None
        self._handle: ChildProcess | None = None
        self._worker: threading.Thread | None = None
        self._paused: set[str] = set()
        self._closed = False
        #: The accountant code and libraries this table's figures are valid for.
        self.method = method_fingerprint()
        self._load()
        close_at_exit(self)

    @property
    def child_running(self) -> bool:
        """Whether a child (foreground or background) is running now."""
        with self._lock:
            return self._running is not None

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            body = json.loads(self.path.read_text())
            if not isinstance(body, dict) or body.get("format") != TABLE_FORMAT:
                raise ValueError(f"not an epsilon table of format {TABLE_FORMAT}")
            if body["sha256"] != body_digest(body["method"], body["sigmas"],
                                              body["epsilons"]):
                raise ValueError("its SHA-256 does not match its body (partial or edited)")
            if body["method"] != self.method:
                raise ValueError("made by other accountant code or library versions")
            epsilons = {TableKey.from_text(k).text(): valid_entries(v)
                        for k, v in body["epsilons"].items()}
            sigmas = {str(k): number(v) for k, v in body["sigmas"].items()}
            if not all(v > 0 and math.isfinite(v) for v in sigmas.values()):
                raise ValueError("a stored sigma is not positive and finite")
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            self.rebuilt_files += 1
            log.warning("%s: unusable epsilon table (%s); recomputing its figures",
                        self.path, exc)
            return
        self._epsilons, self._sigmas = epsilons, sigmas

    def _save(self, epsilons: dict[str, dict[int, float]], sigmas: dict[str, float]) -> None:
        """With the lock held: write these entries atomically, then make them the table's
        (nothing is served that is not on disk); AccountingError if the write fails."""
        stored = {k: {str(n): e for n, e in sorted(v.items())} for k, v in epsilons.items() if v}
        body = {"format": TABLE_FORMAT, "method": self.method, "sigmas": sigmas,
                "epsilons": stored, "sha256": body_digest(self.method, sigmas, stored)}
        try:
            atomic_write_bytes(self.path, json.dumps(body, indent=0, sort_keys=True).encode())
        except OSError as exc:
            raise AccountingError(f"epsilon table not stored: {exc}") from exc
        self._epsilons, self._sigmas = epsilons, sigmas

    def entries(self, key: TableKey) -> dict[int, float]:
        """A copy of the stored {steps: epsilon} of ``key`` (empty if none)."""
        with self._lock:
            return dict(self._epsilons.get(key.text(), {}))

    def epsilon_of_segments(self, segments: list[Segment], delta: float, accountant: str,
                            stride: int = 1) -> float:
        """The accountant's epsilon of ``segments``; a miss computes ``n, n + stride, ...``
        (or waits for the running child that does), a figure served close to the end of its
        key's entries starts the next chunk in the background."""
        keyed = TableKey.of(segments, delta, accountant)
        if keyed is None:
            return 0.0
        key, steps = keyed
        name, stride = key.text(), max(1, stride)
        waited = False
        while True:
            with self._lock:
                figure = self._epsilons.get(name, {}).get(steps)
                if figure is not None:
                    self._ask_ahead(name, steps, stride)
                    return figure
                if not waited:
                    waited, self.foreground_waits = True, self.foreground_waits + 1
                job = self._claim_or_wait(ChildJob(name, chunk_counts(steps, stride,
                                                                      self.chunk), False))
            if job is not None:
                self._run_job(job)  # AccountingError: no figure, the caller's round stops

    def _claim_or_wait(self, job: ChildJob) -> ChildJob | None:
        """With the lock held: take the child slot for ``job`` (returned), or wait until the
        running child ends (None: look again). AccountingError if it never ends."""
        if self._running is None:
            self._running = job
            self.children_run += 1
            self.foreground_children += 1
            return job
        # The child running now may cover this count; if not, it holds the one slot. Wait for
        # that child to end, not for the slot to be free: another caller may take the slot
        # first, and the figure this caller needs may already be stored by then.
        running = self._running
        if not self._changed.wait_for(lambda: self._running is not running,
                                      timeout=CHILD_TIMEOUT_S + 60.0):
            raise AccountingError("the running epsilon table child did not finish")
        return None

    def _ask_ahead(self, name: str, steps: int, stride: int) -> None:
        """With the lock held: start the background child for ``name`` if its entries past
        ``steps`` run short and no child is running (see the class docstring)."""
        if self._closed or self._running is not None or name in self._paused:
            return
        counts = prefetch_counts(self._epsilons[name], steps, stride, self.chunk, self.margin)
        if counts is None:
            return
        job = ChildJob(name, counts, True)
        worker = threading.Thread(target=self._run_job, args=(job,),
                                  name="epsilon-table-ahead", daemon=True)
        self._running = job
        try:
            worker.start()
        except RuntimeError as exc:  # no thread (a process or memory limit): no child either
            self._running = None
            self._paused_after_failure(job, f"its thread did not start: {exc}")
            return
        self._worker, self.children_run = worker, self.children_run + 1

    def _run_job(self, job: ChildJob) -> None:
        """Run ``job``'s child without the lock, then check and store its figures under it.
        The slot is freed and waiters woken whatever happens. A foreground failure raises
        AccountingError; a background one is logged and counted."""
        handle = ChildProcess()
        try:
            with self._lock:
                if job.background and self._closed:
                    raise AccountingError("the epsilon table was closed")
                self._handle = handle
            reply = self._run_child(job.request(), handle)
            with self._lock:
                self._store(job, reply)
                if job.background:
                    self.background_chunks += 1
                else:
                    self._paused.discard(job.key)
        except AccountingError as exc:
            if not job.background:
                raise
            self._background_failed(job, exc)
        finally:
            with self._lock:
                self._running = self._handle = None
                self._changed.notify_all()

    def _background_failed(self, job: ChildJob, exc: AccountingError) -> None:
        """Log and count a failed background job, and ask ahead for its key no more until a
        foreground child for it succeeds (its next miss then computes in the foreground)."""
        with self._lock:
            if self._closed:
                log.info("%s: computing epsilon figures ahead stopped (%s)", self.path, exc)
                return
            self._paused_after_failure(job, str(exc))

    def _paused_after_failure(self, job: ChildJob, why: str) -> None:
        """With the lock held: the logging, counting and pausing of :meth:`_background_failed`."""
        log.warning("%s: computing epsilon figures ahead failed (%s); the next miss "
                    "computes them in the foreground", self.path, why)
        self.background_failures += 1
        self._paused.add(job.key)

    def _store(self, job: ChildJob, reply: dict[str, object]) -> None:
        """With the lock held: merge a reply's figures into ``job.key``'s entries and write
        the file; AccountingError (nothing stored) unless it answers exactly ``job``."""
        counts = list(job.counts)
        figures = reply.get("epsilons")
        if (reply.get("key") != job.key or reply.get("steps") != counts
                or not isinstance(figures, list) or len(figures) != len(counts)):
            raise AccountingError(f"epsilon table child gave {reply!r}")
        stored = self._epsilons.get(job.key, {})
        try:
            fresh = valid_entries(dict(zip(counts, figures, strict=True)))
            merged = valid_entries({**stored, **fresh})
        except (ValueError, TypeError) as exc:
            raise AccountingError(f"epsilon table child's figures: {exc}") from exc
        self._save({**self._epsilons, job.key: merged}, self._sigmas)

    def sigma_for(self, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  accountant: str) -> float:
        """The accountant's ``sigma_for``, computed once in a child and stored."""
        name = sigma_key(target_epsilon, delta, sample_rate, steps, accountant)
        while True:
            with self._lock:
                if name in self._sigmas:
                    return self._sigmas[name]
                job = self._claim_or_wait(ChildJob("sigma " + name, (), False))
            if job is not None:
                self._run_sigma({"kind": "sigma", "target_epsilon": target_epsilon,
                                 "delta": delta, "sample_rate": sample_rate,
                                 "steps": steps, "accountant": accountant}, name)

    def _run_sigma(self, request: dict[str, object], name: str) -> None:
        """Run a ``sigma`` request in the child slot the caller holds, store its answer."""
        try:
            reply = self._run_child(request, ChildProcess())
            sigma = reply.get("sigma")
            if not (type(sigma) is float and sigma > 0 and math.isfinite(sigma)):
                raise AccountingError(f"epsilon table child gave {reply!r}")
            with self._lock:
                self._save(self._epsilons, {**self._sigmas, name: sigma})
        finally:
            with self._lock:
                self._running = None
                self._changed.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Stop asking ahead: no background child starts again, a running one is killed and
        its thread joined (up to ``timeout`` s). Lookups still work, computing in the
        foreground. Idempotent; also run at interpreter exit."""
        with self._lock:
            self._closed = True
            worker = self._worker
            if self._running is not None and self._running.background and self._handle:
                self._handle.kill()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    def _run_child(self, request: dict[str, object],
                   handle: ChildProcess) -> dict[str, object]:
        """Run :mod:`.table_child` on one request; AccountingError if it fails."""
        return run_child({**request, "method": self.method}, timeout=CHILD_TIMEOUT_S,
                         handle=handle)
