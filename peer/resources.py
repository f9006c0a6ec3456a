"""What this process costs the device: its peak resident memory, for the status line and the
simulation's report.

The peak is the kernel's high-water mark of the resident set (``VmHWM`` in
``/proc/self/status``): it only grows, so one read shows the worst moment of the run so far,
not the moment of the read. Where ``/proc`` is absent (macOS), ``ru_maxrss`` is the same figure
(in bytes there, in KiB on Linux); Linux's ``ru_maxrss`` is not used because it carries a
parent's peak across fork + exec.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
MIB = 1024 * 1024


def _vmhwm_kib() -> int | None:
    """VmHWM from /proc/self/status in KiB (None: no /proc, or no such line)."""
    try:
        with _STATUS.open() as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_mb() -> float | None:
    """This process's peak resident set in MiB (None if the platform reports neither)."""
    kib = _vmhwm_kib()
    if kib is not None:
        return kib * 1024 / MIB
    if sys.platform == "darwin":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB
    return None
