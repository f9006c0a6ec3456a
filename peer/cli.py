"""``murmur-peer``: create a network, identities and certificates; provision; run a peer.

Every user error (missing file, bad config, an output that exists) ends with one line on
stderr and exit code 2, never a traceback. No command ever overwrites a secret key file;
``enroll`` overwrites a certificate only with ``--force``.

Subcommands::

    murmur-peer network create --network NET --out admission.key
    murmur-peer identity create --peer NAME --out DIR
    murmur-peer enroll --admission admission.key --public NAME.pub --out NAME.cert [--days 365]
    murmur-peer provision --network NET --peers a,b,c --out DIR [--days N] [--broker-url URL]
                          [--demo]
    murmur-peer run --config peer.toml
    murmur-peer serve --config peer.toml [--owner NAME] [--standalone] [--max-clients N]
                      [--rows-per-minute R]
    murmur-peer publish-snapshot --config peer.toml --servers a,b,c [--threshold 2]
                                 [--max-rows-per-client N]

``provision --clients NAMES [--owner NAME]`` also issues client certificates (role ``client``:
they may query serving peers, never train) and writes the model owner they trust into their
configs. The client itself is ``murmur-query``
(``python -m peer.query``); private predictions are described in docs/inference.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from crypto.errors import CryptoError
from peer.config import ConfigError, load_config
from peer.demo import DEMO_BUDGET_HOURS
from peer.errors import PeerError
from peer.network.transport import TransportError
from peer.provision import (
    DEFAULT_CERT_DAYS,
    ProvisionError,
    issue_certificate,
    load_public_identity,
    parse_peer_list,
    provision,
    save_public_identity,
    write_file_atomic,
)
from peer.status import PlainReport, format_status
from peer.waiting import wait_event

PROG = "murmur-peer"
EXIT_USAGE = 2
EXIT_FAILURE = 1

# Without a terminal (systemd, a pipe) the status line is printed on events that matter and
# otherwise this often, instead of being refreshed in place, so a journal is not flooded.
_PLAIN_STATUS_EVERY_S = 60.0
# ...and completed sessions get at most one line this often (with their count).
_PLAIN_SESSIONS_EVERY_S = 10.0
# How often the plain printer looks at the events recorded since its last look.
_PLAIN_TICK_S = 1.0

_log = logging.getLogger("murmur.peer")


class UserError(PeerError):
    """Something the user can fix; printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------- commands
def _cmd_network_create(args: argparse.Namespace) -> int:
    from crypto.admission import AdmissionKey

    out = Path(args.out)
    public_path = out.with_suffix(".pub")
    if public_path == out:
        raise UserError(f"{out}: the secret key file must not end in .pub")
    for path in (out, public_path):
        if path.exists():
            raise UserError(f"{path}: exists; refusing to overwrite it")
    key = AdmissionKey.generate(args.network)
    key.save(out)
    public_hex = key.public_key.hex()
    write_file_atomic(public_path, (public_hex + "\n").encode(), mode=0o644)
    print(public_hex)
    print(f"network {args.network}: secret admission key in {out} (keep it offline), "
          f"public key in {public_path}", file=sys.stderr)
    return 0


def _cmd_identity_create(args: argparse.Namespace) -> int:
    from crypto.identity import Identity

    directory = Path(args.out)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory}: exists and is not a directory")
    identity = Identity.generate(args.peer)  # validates the name before touching the disk
    key_path, pub_path = directory / f"{args.peer}.key", directory / f"{args.peer}.pub"
    for path in (key_path, pub_path):
        if path.exists():
            raise UserError(f"{path}: exists; refusing to overwrite it")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity.save(key_path)
    save_public_identity(pub_path, identity.public)
    print(f"{key_path} (secret, 0600)")
    print(f"{pub_path} (public: give it to the network operator to enroll)")
    return 0


def _cmd_enroll(args: argparse.Namespace) -> int:
    from crypto.admission import AdmissionKey

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"{out}: exists; pass --force to replace the certificate")
    admission = AdmissionKey.load(Path(args.admission))
    public = load_public_identity(Path(args.public))
    cert = issue_certificate(admission, public, out, days=args.days, overwrite=args.force)
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(cert.expires_at))
    print(f"{out}: certificate of {cert.peer_id!r} for network {cert.network_id!r}, "
          f"valid until {expires}")
    return 0


def _cmd_provision(args: argparse.Namespace) -> int:
    names = parse_peer_list(args.peers)
    clients = parse_peer_list(args.clients) if args.clients.strip() else []
    result = provision(args.network, names, Path(args.out), days=args.days,
                       broker_url=args.broker_url, demo=args.demo, clients=clients,
                       owner=args.owner)
    print(f"network {result.network_id}: admission public key {result.admission_public_hex}")
    print(f"  {result.admission_key} (secret: keep offline after provisioning)")
    for files in result.peers:
        print(f"  {files.peer_id}: {files.identity}, {files.certificate}, {files.config}")
        if files.data is not None:
            print(f"    data: {files.data} ({_shard_summary(files.data)})")
    for files in result.clients:
        print(f"  client {files.peer_id}: {files.identity}, {files.certificate}, {files.config}")
    print(f"  mosquitto: {result.mosquitto_conf} (uses {result.mosquitto_passwd}, "
          f"{result.mosquitto_acl})")
    return 0


def _shard_summary(path: Path) -> str:
    """'312 records, mostly labels 3, 7, 0' for a demo shard."""
    from peer.training.data import load_table

    shard = load_table(path)
    counts = sorted(((int((shard.y == c).sum()), c) for c in range(shard.num_classes)),
                    reverse=True)
    return f"{len(shard)} records, mostly labels " + ", ".join(str(c) for _n, c in counts[:3])


# ------------------------------------------------------------------------------------- run
def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,  # opacus calls basicConfig at import time; ours must win
    )


class StatusPrinter:
    """Refreshes the status line in place on a terminal; prints whole lines otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def width(self) -> int | None:
        """The terminal's width less one (a full-width line would wrap); None off a terminal."""
        return shutil.get_terminal_size((100, 24)).columns - 1 if self.tty else None

    def show(self, line: str) -> None:
        if self.tty:
            # \r + erase-to-end keeps one line that is rewritten in place.
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _status_line(peer: Any, printer: StatusPrinter, started: float,
                 note: str | None = None) -> str:
    return format_status(peer.status(), uptime_s=time.monotonic() - started, note=note,
                         max_width=printer.width())


async def _terminal_loop(peer: Any, printer: StatusPrinter, started: float,
                         interval_s: float) -> None:
    while True:
        printer.show(_status_line(peer, printer, started))
        await asyncio.sleep(interval_s)


class _EventWake:
    """The node's event callback for ``murmur-peer run``: records the event in the report and
    wakes the plain printer. Runs inside the node's code on the event loop, so it stays cheap
    (a few assignments; no formatting, no I/O)."""

    def __init__(self, report: PlainReport) -> None:
        self.report = report
        self.event = asyncio.Event()  # binds to the running loop on first wait (3.10+)

    def __call__(self, event: Any) -> None:
        self.report.on_event(event)
        self.event.set()


async def _plain_loop(peer: Any, printer: StatusPrinter, wake: _EventWake,
                      started: float) -> None:
    """Without a terminal: the lines the report asks for, checked on each event and tick."""
    while True:
        status = peer.status()
        now = time.monotonic()
        for note in wake.report.due(now, status.connected):
            printer.show(format_status(status, uptime_s=now - started, note=note))
        await wait_event(wake.event, _PLAIN_TICK_S)
        wake.event.clear()


async def _run_peer(peer: Any, status_interval_s: float, wake: _EventWake) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0
    peer_task = asyncio.create_task(peer.run(stop))

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            _log.info("%s received: leaving cleanly (again to force)",
                      signal.Signals(signum).name)
            stop.set()
        else:
            # A second signal: the user does not want to wait for the graceful path.
            peer_task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    printer = StatusPrinter(sys.stdout)
    started = wake.report.started
    status = asyncio.create_task(
        _terminal_loop(peer, printer, started, status_interval_s) if printer.tty
        else _plain_loop(peer, printer, wake, started))
    try:
        await peer_task
    except asyncio.CancelledError:
        _log.warning("forced stop: the session in flight was not finished")
        return 130
    finally:
        status.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await status
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if not printer.tty:  # what happened since the last tick, then the final figures
            for note in wake.report.flush():
                printer.show(_status_line(peer, printer, started, note))
        printer.show(_status_line(peer, printer, started, "stopped"))
        printer.finish()
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(Path(args.config))
    _configure_logging(cfg.log_level)
    from peer.assembly import load_credentials, peer_from_config  # lazy: pulls in the node
    from peer.training.checkpoint import CheckpointError
    from peer.training.ledger import LedgerError

    load_credentials(cfg)  # fail fast, with one line, before data and model are built
    # Created before the peer: it is the node's event callback (it only records; the status
    # task prints). Its clock starts now, so the uptime includes building the model.
    wake = _EventWake(PlainReport(started=time.monotonic(), heartbeat_s=_PLAIN_STATUS_EVERY_S,
                                  sessions_every_s=_PLAIN_SESSIONS_EVERY_S))
    try:
        peer = peer_from_config(cfg, on_event=wake)
    except (ValueError, OSError, LedgerError, CheckpointError) as exc:
        # Set-up only (data, model, state dir): the user's to fix. Errors while running are
        # not caught here, so a bug still shows its traceback.
        raise UserError(f"cannot start the peer: {exc}") from None
    return asyncio.run(_run_peer(peer, cfg.status_interval_s, wake))


def _cmd_serve(args: argparse.Namespace) -> int:
    from peer.inference.commands import serve
    from peer.inference.serve_config import load_serve_config

    cfg, table = load_serve_config(Path(args.config))
    _configure_logging(cfg.log_level)
    settings = table.with_flags(owner=args.owner, standalone=args.standalone,
                                max_clients=args.max_clients,
                                rows_per_minute=args.rows_per_minute)
    assert settings.owner is not None  # with_flags refuses a missing owner
    return serve(cfg, owner=settings.owner, limits=settings.limits(),
                 standalone=settings.standalone)


def _cmd_publish_snapshot(args: argparse.Namespace) -> int:
    from peer.inference.commands import publish_snapshot

    cfg = load_config(Path(args.config))
    _configure_logging(cfg.log_level)
    return publish_snapshot(cfg, servers=parse_peer_list(args.servers),
                            threshold=args.threshold,
                            max_rows_per_client=args.max_rows_per_client)


def _add_inference_commands(commands: Any) -> None:
    from peer.inference.serve_config import ServeConfig

    serve = commands.add_parser("serve", help="serve private predictions of a model owner's "
                                              "snapshots until SIGINT/SIGTERM")
    serve.add_argument("--config", required=True, help="peer TOML config")
    # Each flag defaults to None: not given, so the config's [serve] key (or its default,
    # peer.inference.serve_config.ServeConfig) holds.
    serve.add_argument("--owner", help="the peer whose snapshots to accept "
                                       "(or [serve] owner)")
    serve.add_argument("--standalone", action=argparse.BooleanOptionalAction, default=None,
                       help="announce this peer itself (when no `murmur-peer run` of it does)")
    serve.add_argument("--max-clients", type=int,
                       help=f"client accounts per snapshot (default {ServeConfig.max_clients})")
    serve.add_argument("--rows-per-minute", type=int,
                       help="rows answered per client per minute "
                            f"(default {ServeConfig.rows_per_minute})")
    serve.set_defaults(handler=_cmd_serve)
    publish = commands.add_parser("publish-snapshot",
                                  help="share this peer's scatter model to serving peers")
    publish.add_argument("--config", required=True, help="the model owner's peer TOML config")
    publish.add_argument("--servers", required=True, help="comma-separated serving peers")
    publish.add_argument("--threshold", type=int, default=2, help="Shamir threshold t (2)")
    publish.add_argument("--max-rows-per-client", type=int, default=1000,
                         help="rows each serving peer answers per client (default 1000)")
    publish.set_defaults(handler=_cmd_publish_snapshot)


# ---------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Murmur peer: private gossip learning over MQTT.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    network = commands.add_parser("network", help="network admission key")
    network_cmds = network.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = network_cmds.add_parser("create", help="create a network's admission key")
    create.add_argument("--network", required=True, help="network id")
    create.add_argument("--out", required=True,
                        help="secret key file to write (e.g. admission.key)")
    create.set_defaults(handler=_cmd_network_create)

    identity = commands.add_parser("identity", help="peer identities")
    identity_cmds = identity.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = identity_cmds.add_parser("create", help="create a peer identity (NAME.key, NAME.pub)")
    create.add_argument("--peer", required=True, help="peer id")
    create.add_argument("--out", required=True, help="directory for NAME.key and NAME.pub")
    create.set_defaults(handler=_cmd_identity_create)

    enroll = commands.add_parser("enroll", help="sign a peer certificate with the admission key")
    enroll.add_argument("--admission", required=True, help="admission key file")
    enroll.add_argument("--public", required=True, help="the peer's NAME.pub")
    enroll.add_argument("--out", required=True, help="certificate file to write (NAME.cert)")
    enroll.add_argument("--days", type=float, default=DEFAULT_CERT_DAYS,
                        help=f"validity in days (default {DEFAULT_CERT_DAYS})")
    enroll.add_argument("--force", action="store_true", help="replace an existing certificate")
    enroll.set_defaults(handler=_cmd_enroll)

    prov = commands.add_parser(
        "provision", help="create a whole network: keys, certificates, broker credentials, ACL")
    prov.add_argument("--network", required=True, help="network id")
    prov.add_argument("--peers", required=True, help="comma-separated peer ids, e.g. a,b,c")
    prov.add_argument("--out", required=True, help="output directory")
    prov.add_argument("--days", type=float, default=DEFAULT_CERT_DAYS,
                      help=f"certificate validity in days (default {DEFAULT_CERT_DAYS})")
    prov.add_argument("--broker-url", default="mqtt://127.0.0.1:1883",
                      help="broker url written into the peer configs")
    prov.add_argument("--clients", default="",
                      help="comma-separated client ids: certificates of role client, which may "
                           "query serving peers but never train (docs/inference.md)")
    prov.add_argument("--owner", default=None,
                      help="with --clients: the model owner (one of --peers) written into each "
                           "client's config as owner, so murmur-query needs no --owner")
    prov.add_argument("--demo", action="store_true",
                      help="give each peer its own non-IID shard of the digits training split "
                           "(DIR/data/NAME.npz), evaluate on the digits test split, and pace "
                           f"the privacy budget over {DEMO_BUDGET_HOURS:g} h")
    prov.set_defaults(handler=_cmd_provision)

    run = commands.add_parser("run", help="run a peer until SIGINT/SIGTERM")
    run.add_argument("--config", required=True, help="peer TOML config")
    run.set_defaults(handler=_cmd_run)
    _add_inference_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``murmur-peer``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    # The key-file commands only fail on user input (a bad name, a path); `run` converts its
    # own set-up errors, so a ValueError/OSError raised while a peer runs keeps its traceback.
    user_errors: tuple[type[BaseException], ...] = (
        UserError, ConfigError, CryptoError, ProvisionError, TransportError, FileExistsError)
    if args.command != "run":
        user_errors += (ValueError, PeerError)
    try:
        try:
            return int(args.handler(args))
        except OSError as exc:
            if args.command == "run" and not isinstance(exc, FileExistsError):
                raise
            name = f"{exc.filename}: " if exc.filename else ""
            raise UserError(f"{name}{exc.strerror or exc}") from None
    except user_errors as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
