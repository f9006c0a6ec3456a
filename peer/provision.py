"""Key and credential files of a Murmur network: public identity files, certificates, and
one-shot provisioning of a whole network (admission key, peers, Mosquitto credentials + ACL).

Security properties:

* Secret files (admission key, peer identities, broker passwords, the Mosquitto password
  file) are written atomically with mode 0600 and are *never* overwritten: provisioning checks
  every output path first and refuses to start if any exists, and each write refuses again at
  the last moment (``os.link`` semantics), so a race cannot clobber a key either.
* Broker passwords come from the OS CSPRNG and are hashed by ``mosquitto_passwd -U`` on a
  private temporary file, so no plaintext password ever appears on a command line (``ps``).
* The ACL lets each peer *publish* only under ``murmur/NET/<its user name>/#`` and *read* only
  announcements and its own inbox; this is the broker-side wall behind the certificate checks,
  never a replacement for them.
* Public files (``.pub``, ``.cert``, the ACL) hold nothing secret and are written 0644.
* Directories it creates: ``peers/`` (identity keys, broker passwords) and ``data/`` (the
  demo's shards) are 0700. The output directory and ``mosquitto/`` are 0711: other users may
  pass through them but not list them, so a broker running as its own user reaches the ACL
  and, once the operator hands it the file (``chown mosquitto``), the password file. Every
  secret in them (``admission.key``, ``mosquitto/passwd``) is a 0600 file; a directory that
  exists already keeps its mode.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crypto.admission import ROLE_CLIENT, ROLE_PEER, AdmissionKey, Certificate
from crypto.errors import CertificateError
from crypto.identity import Identity, PublicIdentity, check_name
from peer.demo import DEMO_BUDGET_HOURS, DEMO_SOURCE, DemoDataError, demo_shard_bytes
from peer.errors import PeerError
from peer.files import FileReadError, atomic_write_bytes, read_small_file
from peer.provision_clients import client_config_text, mosquitto_acl_with_clients

PUBLIC_IDENTITY_FORMAT = "murmur-public-identity"
PUBLIC_IDENTITY_VERSION = 1
DEFAULT_CERT_DAYS = 365
MOSQUITTO_PASSWD = "mosquitto_passwd"
_MAX_PUBLIC_FILE = 64 * 1024
_DAY_S = 86_400.0
#: Mode of a directory that holds secrets only its owner reads (peer keys, demo shards).
PRIVATE_DIR_MODE = 0o700
#: Mode of a directory the broker, running as another user, must pass through to reach its
#: files: traversable by others but not listable; what is secret in it is a 0600 file.
TRAVERSABLE_DIR_MODE = 0o711


class ProvisionError(PeerError):
    """A file could not be produced (exists already, unreadable input, tool missing...)."""


# ---------------------------------------------------------------------------------- writing
def write_file_atomic(path: Path, data: bytes, *, mode: int, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (``peer.files.atomic_write_bytes``), mode ``mode``.

    Without ``overwrite`` an existing file is never replaced (FileExistsError), even by a race:
    provisioned files are never overwritten unless asked.
    """
    atomic_write_bytes(path, data, mode=mode, overwrite=overwrite)


def _read_public_file(path: Path, what: str) -> bytes:
    try:
        return read_small_file(path, _MAX_PUBLIC_FILE, what)
    except FileReadError as exc:
        raise ProvisionError(str(exc)) from None


# ------------------------------------------------------------------------ public identities
def public_identity_bytes(public: PublicIdentity) -> bytes:
    document = {
        "format": PUBLIC_IDENTITY_FORMAT,
        "version": PUBLIC_IDENTITY_VERSION,
        "peer_id": public.peer_id,
        "verify_key": public.verify_key.hex(),
        "box_key": public.box_key.hex(),
    }
    return (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()


def save_public_identity(path: Path, public: PublicIdentity) -> None:
    """Write a peer's public identity (what the network operator enrolls); 0644, no overwrite."""
    write_file_atomic(path, public_identity_bytes(public), mode=0o644)


def load_public_identity(path: Path) -> PublicIdentity:
    """Read a ``.pub`` file written by :func:`save_public_identity`; ProvisionError if bad."""
    data = _read_public_file(Path(path), "public identity file")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProvisionError(f"{path}: not a murmur public identity file (not JSON)") from None
    if not isinstance(document, dict) or document.get("format") != PUBLIC_IDENTITY_FORMAT:
        hint = " (it looks like a secret key file: pass NAME.pub)" if isinstance(
            document, dict) and document.get("format") == "murmur-key" else ""
        raise ProvisionError(f"{path}: not a murmur public identity file{hint}")
    if document.get("version") != PUBLIC_IDENTITY_VERSION:
        raise ProvisionError(f"{path}: unsupported version {document.get('version')!r}")
    try:
        return PublicIdentity(
            peer_id=str(document["peer_id"]),
            verify_key=bytes.fromhex(str(document["verify_key"])),
            box_key=bytes.fromhex(str(document["box_key"])),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ProvisionError(f"{path}: bad public identity field: {exc}") from None


def load_certificate(path: Path) -> Certificate:
    """Read a certificate file (``Certificate.to_bytes``); ProvisionError if unreadable."""
    data = _read_public_file(Path(path), "certificate file")
    try:
        return Certificate.from_bytes(data)
    except (CertificateError, ValueError) as exc:
        raise ProvisionError(f"{path}: not a valid certificate: {exc}") from None


def issue_certificate(admission: AdmissionKey, public: PublicIdentity, out: Path, *,
                      days: float = DEFAULT_CERT_DAYS, now: float | None = None,
                      overwrite: bool = False, role: str = ROLE_PEER) -> Certificate:
    """Sign ``public`` into a certificate of ``role`` valid for ``days``; write it to ``out``
    (0644)."""
    if not 0 < days <= 36_500:
        raise ProvisionError(f"days must be in (0, 36500], got {days:g}")
    now = time.time() if now is None else now
    cert = admission.issue(public, valid_for_s=days * _DAY_S, now=now, role=role)
    write_file_atomic(out, cert.to_bytes(), mode=0o644, overwrite=overwrite)
    return cert


# ------------------------------------------------------------------------------- mosquitto
def mosquitto_acl(network_id: str) -> str:
    """Mosquitto ACL: a peer (user name = peer id) writes only its own topics."""
    check_name(network_id, "network id")
    return (
        f"# Murmur network {network_id!s}: generated by murmur-peer provision.\n"
        "# A peer's broker user name is its peer id (%u). It may publish only under its own\n"
        "# topics (announce, leave, its outgoing direct messages) and read only announcements\n"
        "# and its own inbox, plus the session topics of masked sessions (every payload there\n"
        "# is sealed for the session's members). Everything else is denied (Mosquitto's\n"
        "# default with an ACL file).\n"
        "# Mosquitto warns that the announce pattern has no %u/%c: intended, every peer may\n"
        "# read every announcement, in any bucket (murmur/NET/PEER/announce/BUCKET: all of\n"
        "# them, some buckets, or one peer's topic; a `topic` line here would apply to\n"
        "# anonymous clients only).\n"
        f"pattern write murmur/{network_id}/%u/#\n"
        f"pattern read murmur/{network_id}/+/announce/+\n"
        f"pattern read murmur/{network_id}/+/to/%u\n"
        f"pattern read murmur/{network_id}/+/session/+\n"
    )


def hash_mosquitto_passwords(credentials: dict[str, str],
                             tool: str = MOSQUITTO_PASSWD) -> str:
    """Return Mosquitto password-file lines (``user:$7$...``) for ``credentials``.

    The plaintext goes through a 0600 file in a private temporary directory that
    ``mosquitto_passwd -U`` hashes in place; it never appears in argv.
    """
    binary = shutil.which(tool)
    if binary is None:
        raise ProvisionError(f"{tool} not found: install the mosquitto package")
    for user, password in credentials.items():
        check_name(user, "broker user")
        if ":" in password or "\n" in password:
            raise ProvisionError("broker passwords must not contain ':' or newlines")
    with tempfile.TemporaryDirectory(prefix="murmur-passwd-") as tmp:
        plain = Path(tmp) / "passwd"
        text = "".join(f"{user}:{password}\n" for user, password in credentials.items())
        write_file_atomic(plain, text.encode(), mode=0o600)
        result = subprocess.run([binary, "-U", str(plain)], capture_output=True, text=True,
                                timeout=60, check=False)
        if result.returncode != 0:
            raise ProvisionError(f"{tool} -U failed: {result.stderr.strip() or result.stdout}")
        hashed = plain.read_text()
    lines = [line for line in hashed.splitlines() if line]
    if len(lines) != len(credentials) or any(":$" not in line for line in lines):
        raise ProvisionError(f"{tool} produced an unexpected password file")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- provision
@dataclass(frozen=True)
class PeerFiles:
    """Where provisioning put one peer's files (all inside the output directory)."""

    peer_id: str
    identity: Path
    public: Path
    certificate: Path
    broker_password: Path
    config: Path
    data: Path | None = None  # the demo's shard (provision --demo), else None


@dataclass(frozen=True)
class ProvisionResult:
    network_id: str
    admission_key: Path
    admission_public: Path
    admission_public_hex: str
    peers: tuple[PeerFiles, ...]
    mosquitto_passwd: Path
    mosquitto_acl: Path
    mosquitto_conf: Path
    clients: tuple[PeerFiles, ...] = ()  # provision --clients: role client, never training


def parse_peer_list(text: str) -> list[str]:
    """"a,b, c" -> ["a", "b", "c"]; ValueError on an invalid or duplicate name, or none."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("no peer names given")
    for name in names:
        check_name(name, "peer name")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"peer name {duplicates[0]!r} given twice")
    return names


def _data_lines(files: PeerFiles) -> str:
    if files.data is None:
        return 'data = "digits"\n'
    return (
        "# The demo: this peer's own non-IID shard of the digits training split, measured on\n"
        "# the digits test split that every demo peer shares (public data: no privacy spent).\n"
        f'data = "npz:../{files.data.parent.name}/{files.data.name}"\n'
        f'evaluate = "{DEMO_SOURCE}"\n'
    )


def _pace_lines(files: PeerFiles) -> str:
    if files.data is None:
        return ""
    return (
        "\n[pace]\n"
        "# The demo's privacy budget lasts this long of private training; afterwards the peer\n"
        "# keeps averaging with its groups, which spends no epsilon.\n"
        f"budget_hours = {DEMO_BUDGET_HOURS}\n"
    )


def _peer_config_text(network_id: str, files: PeerFiles, broker_url: str) -> str:
    return (
        f"# Murmur peer {files.peer_id} of network {network_id}; generated by murmur-peer "
        "provision.\n"
        "# Paths are relative to this file. Reference: docs/peer.md.\n"
        f'peer_id = "{files.peer_id}"\n'
        f'network_id = "{network_id}"\n'
        f'identity_file = "{files.identity.name}"\n'
        f'certificate_file = "{files.certificate.name}"\n'
        'admission_public_key = "../admission.pub"\n'
        f'state_dir = "../state/{files.peer_id}"\n'
        + _data_lines(files) +
        "\n[broker]\n"
        f'url = "{broker_url}"\n'
        f'username = "{files.peer_id}"\n'
        f'password_file = "{files.broker_password.name}"\n'
        "\n[training]\n"
        "# DP-SGD; see docs/peer.example.toml for every field.\n"
        "target_epsilon = 8.0\n"
        "\n[session]\n"
        "# group_size, threshold, timeouts: defaults in docs/peer.md\n"
        + _pace_lines(files)
    )


def _mosquitto_conf_text(passwd: Path, acl: Path) -> str:
    return (
        "# Mosquitto settings for a Murmur network (include from your mosquitto.conf or copy).\n"
        "# Add a TLS listener (certfile/keyfile) before exposing the broker beyond loopback.\n"
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"password_file {passwd}\n"
        f"acl_file {acl}\n"
        "# Murmur payloads are at most 8 MiB; leave room for framing.\n"
        "max_packet_size 16777216\n"
        "# Without it Mosquitto's own small writes wait on Nagle + delayed ACK: measured here,\n"
        "# a request/response between two peers takes ~44 ms instead of ~1.5 ms.\n"
        "set_tcp_nodelay true\n"
    )


def provision(network_id: str, peer_names: Sequence[str], out: Path, *,
              days: float = DEFAULT_CERT_DAYS, broker_url: str = "mqtt://127.0.0.1:1883",
              now: float | None = None, demo: bool = False,
              clients: Sequence[str] = (), owner: str | None = None) -> ProvisionResult:
    """Create every file of a new network in ``out`` (created if needed); never overwrite.

    Layout::

        out/admission.key            0600  the network's admission (CA) secret: keep offline
        out/admission.pub            0644  its public key, hex (peers pin it)
        out/peers/NAME.key           0600  peer identity (secret)
        out/peers/NAME.pub           0644  public identity
        out/peers/NAME.cert          0644  admission certificate
        out/peers/NAME.broker-password 0600 broker password (plaintext, for password_file)
        out/peers/NAME.toml          0644  a starting peer config
        out/mosquitto/passwd         0600  hashed broker passwords
        out/mosquitto/acl            0644  per-peer topic ACL
        out/mosquitto/murmur.conf    0644  the Mosquitto settings that use the two above
        out/data/NAME.npz            0600  with ``demo``: the peer's shard (:func:`demo_shards`)

    Directories it creates: ``out`` and ``out/mosquitto`` 0711 (the broker's user passes
    through them), ``out/peers`` and ``out/data`` 0700; an existing directory keeps its mode.

    With ``demo`` each config trains on its peer's shard, is evaluated on the digits test
    split and paces its budget over :data:`DEMO_BUDGET_HOURS` (``[pace]``). With ``clients``,
    ``out/clients/NAME.*`` hold each client's files (certificate of role ``client``) and the
    ACL is written per user (peer/provision_clients.py); ``owner``, one of the peers, is the
    model owner written into each client's config (``owner = "NAME"``, the default of
    ``murmur-query --owner``).
    """
    check_name(network_id, "network id")
    names = parse_peer_list(",".join([*peer_names, *clients]))[:len(peer_names)]
    if owner is not None and (owner not in names or not clients):
        raise ProvisionError(f"owner {owner!r}: must be one of the peers ({', '.join(names)}) "
                             "and needs --clients (it is written into their configs)")
    out = Path(out)
    client_dir = out / "clients"
    result = dataclasses.replace(_layout(network_id, names, out, demo),
                                 clients=_client_layout(client_dir, clients))
    _refuse_existing(result)
    # Hash first: if mosquitto_passwd is missing nothing has been written yet.
    passwords = {files.peer_id: secrets.token_urlsafe(24)
                 for files in (*result.peers, *result.clients)}
    passwd_text = hash_mosquitto_passwords(passwords)
    shards = _demo_data(len(result.peers)) if demo else []  # fails before anything is written

    _make_dirs([(out, TRAVERSABLE_DIR_MODE), (out / "peers", PRIVATE_DIR_MODE),
                (out / "mosquitto", TRAVERSABLE_DIR_MODE),
                *([(out / "data", PRIVATE_DIR_MODE)] if demo else []),
                *([(client_dir, PRIVATE_DIR_MODE)] if clients else [])])
    for path, shard in zip([f.data for f in result.peers if f.data], shards, strict=True):
        write_file_atomic(path, shard, mode=0o600)
    admission = AdmissionKey.generate(network_id)
    admission.save(result.admission_key)
    public_hex = admission.public_key.hex()
    write_file_atomic(result.admission_public, (public_hex + "\n").encode(), mode=0o644)
    for files in result.peers:
        _write_peer(files, admission, passwords[files.peer_id], network_id, broker_url,
                    days=days, now=now)
    for files in result.clients:
        _write_peer(files, admission, passwords[files.peer_id], network_id, broker_url,
                    days=days, now=now, role=ROLE_CLIENT, owner=owner)
    _write_mosquitto(result, passwd_text)
    return dataclasses.replace(result, admission_public_hex=public_hex)


def _layout(network_id: str, names: Sequence[str], out: Path, demo: bool) -> ProvisionResult:
    """Where every file of the network goes (nothing written; the public key's hex is "")."""
    peers_dir, mosq_dir, data_dir = out / "peers", out / "mosquitto", out / "data"
    plan = [
        PeerFiles(name, peers_dir / f"{name}.key", peers_dir / f"{name}.pub",
                  peers_dir / f"{name}.cert", peers_dir / f"{name}.broker-password",
                  peers_dir / f"{name}.toml", data_dir / f"{name}.npz" if demo else None)
        for name in names
    ]
    return ProvisionResult(
        network_id=network_id,
        admission_key=out / "admission.key",
        admission_public=out / "admission.pub",
        admission_public_hex="",
        peers=tuple(plan),
        mosquitto_passwd=mosq_dir / "passwd",
        mosquitto_acl=mosq_dir / "acl",
        mosquitto_conf=mosq_dir / "murmur.conf",
    )


def _client_layout(client_dir: Path, clients: Sequence[str]) -> tuple[PeerFiles, ...]:
    return tuple(PeerFiles(c, client_dir / f"{c}.key", client_dir / f"{c}.pub",
                           client_dir / f"{c}.cert", client_dir / f"{c}.broker-password",
                           client_dir / f"{c}.toml") for c in clients)


def _refuse_existing(result: ProvisionResult) -> None:
    """ProvisionError naming the first output file that already exists: never overwrite."""
    targets = [result.admission_key, result.admission_public, result.mosquitto_passwd,
               result.mosquitto_acl, result.mosquitto_conf]
    for files in (*result.peers, *result.clients):
        targets += [files.identity, files.public, files.certificate, files.broker_password,
                    files.config, *([files.data] if files.data else [])]
    existing = [path for path in targets if path.exists()]
    if existing:
        raise ProvisionError(f"{existing[0]}: exists; provisioning never overwrites "
                             f"({len(existing)} existing output file(s))")


def _write_peer(files: PeerFiles, admission: AdmissionKey, password: str, network_id: str,
                broker_url: str, *, days: float, now: float | None,
                role: str = ROLE_PEER, owner: str | None = None) -> None:
    """One peer's (or client's) identity, public identity, certificate, password and config
    (a client's names ``owner``, when given, as the model owner it trusts)."""
    identity = Identity.generate(files.peer_id)
    identity.save(files.identity)
    save_public_identity(files.public, identity.public)
    issue_certificate(admission, identity.public, files.certificate, days=days, now=now,
                      role=role)
    write_file_atomic(files.broker_password, (password + "\n").encode(), mode=0o600)
    config = (_peer_config_text(network_id, files, broker_url) if role == ROLE_PEER else
              client_config_text(network_id, files.peer_id, files.broker_password.name,
                                 broker_url, owner))
    write_file_atomic(files.config, config.encode(), mode=0o644)


def _write_mosquitto(result: ProvisionResult, passwd_text: str) -> None:
    """The broker's hashed password file, its per-peer ACL and the settings that use them."""
    write_file_atomic(result.mosquitto_passwd, passwd_text.encode(), mode=0o600)
    acl = (mosquitto_acl_with_clients(result.network_id, [f.peer_id for f in result.peers],
                                      [f.peer_id for f in result.clients])
           if result.clients else mosquitto_acl(result.network_id))
    write_file_atomic(result.mosquitto_acl, acl.encode(), mode=0o644)
    write_file_atomic(
        result.mosquitto_conf,
        _mosquitto_conf_text(result.mosquitto_passwd.resolve(),
                             result.mosquitto_acl.resolve()).encode(),
        mode=0o644,
    )


def _make_dirs(directories: Sequence[tuple[Path, int]]) -> None:
    """Create each directory that does not exist yet with exactly its mode (the umask does
    not apply); one that exists is left as it is, since it may be the operator's."""
    for directory, mode in directories:
        try:
            directory.mkdir(parents=True, mode=mode)
        except FileExistsError:
            if not directory.is_dir():
                raise ProvisionError(f"{directory}: exists and is not a directory") from None
            continue
        os.chmod(directory, mode)


def _demo_data(n_peers: int) -> list[bytes]:
    try:
        return demo_shard_bytes(n_peers)
    except DemoDataError as exc:
        raise ProvisionError(str(exc)) from None
