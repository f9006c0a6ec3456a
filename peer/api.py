"""The Python API for embedding a peer in one's own asyncio program.

``from peer import build_peer, run_peer`` gives the daemon's peer (what ``murmur-peer run``
builds: peer/assembly.py is still the one place that assembles it) without its command line,
signal handling or status printer:

* :func:`build_peer` checks everything a config names and builds the peer, without
  connecting: credentials, data (a user loader included), model (a user factory included),
  state directory. Every problem is a typed error here, before any message leaves: ConfigError
  (peer/config.py) for the config, the key files and the data, ModelFactoryError
  (peer/training/user_model.py) for a model of one's own, LedgerError and CheckpointError for
  unreadable state.
* :func:`run_peer` builds the peer off the event loop (loading data and torch takes seconds)
  and runs it until ``stop`` is set, then leaves cleanly (the session in flight aborted, a
  checkpoint written, a LEAVE announced) and returns the stopped peer, whose ``status()``
  holds the final figures. Cancelling the task stops it the same way.

Both take a :class:`peer.config.PeerConfig` or the path of a TOML config file.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from peer.assembly import peer_from_config
from peer.config import PeerConfig, load_config
from peer.network.node import EventCallback, Peer

ConfigSource = PeerConfig | str | os.PathLike[str]


def _config(config: ConfigSource) -> PeerConfig:
    return config if isinstance(config, PeerConfig) else load_config(Path(config))


def build_peer(config: ConfigSource, *, on_event: EventCallback | None = None) -> Peer:
    """The peer ``config`` describes, checked and built but not connected.

    ``on_event`` receives the peer's events (rounds, sessions, budget) on the event loop; it
    must not block. The trainer resumes from the config's ``state_dir``.
    """
    return peer_from_config(_config(config), on_event=on_event)


async def run_peer(config: ConfigSource, *, stop: asyncio.Event | None = None,
                   on_event: EventCallback | None = None) -> Peer:
    """Build the peer (in a worker thread) and run it until ``stop`` is set; returns it.

    Without ``stop`` the peer runs until the task running this coroutine is cancelled; it
    then leaves cleanly before the cancellation propagates.
    """
    peer = await asyncio.to_thread(build_peer, config, on_event=on_event)
    stop = stop if stop is not None else asyncio.Event()
    await peer.run(stop)
    return peer
