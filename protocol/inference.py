"""Wire bodies of private predictions (docs/inference.md, kinds 18-21) and their strict decoders.

Every inference message's header ``session`` is the 16-byte **snapshot id**, so the signature
binds each message to one snapshot and a receiver compares ids before it opens anything. The
sealed parts are sealed (crypto.sealing) for the body's recipient, bound to (network, snapshot
id, sender, recipient, seq).

Size rules, checked before anything is opened:

* SNAPSHOT_SHARE.sealed is exactly ``SEAL_OVERHEAD + 32 + 4 (C D + C)`` (mask seed, then W and
  b at the recipient's point), from the body's own C and D.
* QUERY.sealed is ``SEAL_OVERHEAD + 4 rows D`` for some D: whole field elements, whole rows;
  the serving peer checks D against its snapshot. ANSWER.sealed is ``SEAL_OVERHEAD + 4 rows C``.
* ``rows`` is at most MAX_QUERY_ROWS and the whole message at most MAX_PAYLOAD_BYTES.
* A snapshot's public description (:class:`SnapshotDescription`: network, owner, snapshot id,
  issue time, the ordered server list, t, the public parameters, the content hash) travels as
  the exact bytes the model owner signed, at most MAX_DESCRIPTION_BYTES, with the owner's
  64-byte signature; SNAPSHOT_SHARE and SERVE carry both, so a serving peer re-announces what
  the owner signed and a client checks it (peer/inference/endpoint.py). The bytes are a
  msgpack array that starts with the str DESCRIPTION_TAG, so they can never be mistaken for
  an envelope's signed part (which starts with an integer version). This is the second
  layout of kinds 18 and 19 (description format DESCRIPTION_VERSION = 1); the first, with the
  public parameters inline and no owner signature, is refused as malformed.

This module imports nothing of protocol.messages (which imports it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Final, NoReturn

import msgpack

from protocol.errors import FieldError
from protocol.fields import _bytes, _id_list, _int, _peer_id
from protocol.limits import (
    FIELD_ELEMENT_BYTES,
    MAX_CERTIFICATE_BYTES,
    MAX_MEMBERS,
    MAX_SEALED_BYTES,
    MAX_SEQ_EXCLUSIVE,
    MIN_THRESHOLD,
    SEAL_OVERHEAD_BYTES,
    SESSION_ID_BYTES,
    SIGNATURE_BYTES,
)

#: Most feature rows in one QUERY (and logit rows in one ANSWER).
MAX_QUERY_ROWS: Final = 1024
#: Most features per row and classes per model (crypto.inference.MAX_FEATURES / MAX_CLASSES).
MAX_FEATURES: Final = 1 << 16
MAX_CLASSES: Final = 1 << 10
MAX_FRAC_BITS_INFERENCE: Final = 20
CONTENT_HASH_BYTES: Final = 32
MASK_SEED_BYTES: Final = 32
#: Fewest serving peers: 2t - 1 with the least threshold.
MIN_SERVERS: Final = 2 * MIN_THRESHOLD - 1
#: First element of a signed snapshot description (domain separation) and its format version.
DESCRIPTION_TAG: Final = "murmur/snapshot-description"
DESCRIPTION_VERSION: Final = 1
#: Longest description: MAX_MEMBERS ids of at most 64 characters plus fixed fields (1.6 KB).
MAX_DESCRIPTION_BYTES: Final = 512 + MAX_MEMBERS * 70


@dataclass(frozen=True)
class ServedModel:
    """The public parameters of a snapshot, as SNAPSHOT_SHARE and SERVE carry them."""

    servers: tuple[str, ...]
    threshold: int
    classes: int
    features: int
    frac_w: int
    frac_x: int
    feature_norm_bound: int
    max_rows_per_client: int
    content_hash: bytes


@dataclass(frozen=True)
class SnapshotDescription:
    """What the model owner signs about one snapshot: its public description.

    The order of ``model.servers`` fixes each serving peer's point (index + 1)."""

    network: str
    owner: str
    snapshot_id: bytes
    issued_at_us: int
    model: ServedModel


class _CarriesDescription:
    """A message carrying the owner-signed description bytes: decoded once, on first use."""

    description: bytes

    @cached_property
    def described(self) -> SnapshotDescription:
        return decode_description(self.description)

    @property
    def model(self) -> ServedModel:
        return self.described.model


@dataclass(frozen=True)
class SnapshotShare(_CarriesDescription):
    """Owner to one serving peer: the owner's certificate, the owner-signed description and
    the sealed share."""

    recipient: str
    certificate: bytes
    description: bytes
    owner_signature: bytes
    sealed: bytes


@dataclass(frozen=True)
class Serve(_CarriesDescription):
    """A serving peer's retained announcement of the snapshot it serves (id in the header):
    its certificate, and the owner's certificate, description and signature, as the owner
    sent them."""

    certificate: bytes
    owner_certificate: bytes
    description: bytes
    owner_signature: bytes


@dataclass(frozen=True)
class Query:
    """Client to one serving peer: ``rows`` feature rows' shares at the recipient's point.

    ``counter`` strictly increases per (client, serving peer, snapshot); ``certificate`` is the
    client's, so a serving peer needs no membership to check it."""

    recipient: str
    certificate: bytes
    counter: int
    rows: int
    sealed: bytes


@dataclass(frozen=True)
class Answer:
    """Serving peer to the client: the product shares of the query with this counter."""

    recipient: str
    counter: int
    rows: int
    sealed: bytes


#: Field names in wire order; a ServedModel travels as its fields, in place.
MODEL_FIELDS: Final = ("servers", "threshold", "classes", "features", "frac_w", "frac_x",
                       "feature_norm_bound", "max_rows_per_client", "content_hash")
INFERENCE_FIELDS: Final[dict[type, tuple[str, ...]]] = {
    SnapshotShare: ("recipient", "certificate", "description", "owner_signature", "sealed"),
    Serve: ("certificate", "owner_certificate", "description", "owner_signature"),
    Query: ("recipient", "certificate", "counter", "rows", "sealed"),
    Answer: ("recipient", "counter", "rows", "sealed"),
}


def body_values(body: SnapshotShare | Serve | Query | Answer) -> list[object]:
    """The body's values in wire order."""
    return [getattr(body, field) for field in INFERENCE_FIELDS[type(body)]]


Fields = dict[str, object]
Namer = Callable[[str], str]


def _model(v: Fields, name: Namer) -> ServedModel:
    servers = _id_list(v["servers"], name("servers"), MIN_SERVERS, MAX_MEMBERS)
    threshold = _int(v["threshold"], name("threshold"), MIN_THRESHOLD, MAX_MEMBERS)
    if len(servers) < 2 * threshold - 1:
        raise FieldError(f"{len(servers)} servers cannot answer at threshold {threshold}",
                         name("servers"))
    return ServedModel(
        servers=servers,
        threshold=threshold,
        classes=_int(v["classes"], name("classes"), 2, MAX_CLASSES),
        features=_int(v["features"], name("features"), 1, MAX_FEATURES),
        frac_w=_int(v["frac_w"], name("frac_w"), 0, MAX_FRAC_BITS_INFERENCE),
        frac_x=_int(v["frac_x"], name("frac_x"), 0, MAX_FRAC_BITS_INFERENCE),
        feature_norm_bound=_int(v["feature_norm_bound"], name("feature_norm_bound"), 1,
                                2**30 - 1),
        max_rows_per_client=_int(v["max_rows_per_client"], name("max_rows_per_client"), 0,
                                 MAX_SEQ_EXCLUSIVE - 1),
        content_hash=_bytes(v["content_hash"], name("content_hash"), CONTENT_HASH_BYTES,
                            CONTENT_HASH_BYTES),
    )


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"msgpack ext type {code}")


def encode_description(description: SnapshotDescription) -> bytes:
    """The bytes the owner signs; checked by :func:`decode_description` before they are used."""
    m = description.model
    raw = msgpack.packb([DESCRIPTION_TAG, DESCRIPTION_VERSION, description.network,
                         description.owner, description.snapshot_id, description.issued_at_us,
                         list(m.servers), *[getattr(m, f) for f in MODEL_FIELDS[1:]]],
                        use_bin_type=True)
    if decode_description(raw) != description:
        raise FieldError("the description does not survive its own decoder", "description")
    return raw


def decode_description(raw: object, field: str = "description") -> SnapshotDescription:
    """Strictly decode signed description bytes (limits first); FieldError naming ``field``."""
    raw = _bytes(raw, field, 1, MAX_DESCRIPTION_BYTES)
    try:
        v = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True,
                            max_bin_len=MAX_DESCRIPTION_BYTES, max_str_len=MAX_DESCRIPTION_BYTES,
                            max_array_len=MAX_MEMBERS + 16, max_map_len=0, max_ext_len=0,
                            ext_hook=_reject_ext)
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError,
            RecursionError) as exc:
        raise FieldError(f"not one msgpack object ({exc or type(exc).__name__})",
                         field) from None
    width = 6 + len(MODEL_FIELDS)
    if type(v) is not list or len(v) != width:
        raise FieldError(f"expected an array of {width} values", field)
    if v[0] != DESCRIPTION_TAG or type(v[1]) is not int or v[1] != DESCRIPTION_VERSION:
        raise FieldError(f"not a snapshot description of version {DESCRIPTION_VERSION}", field)
    return SnapshotDescription(
        network=_peer_id(v[2], f"{field}.network"),
        owner=_peer_id(v[3], f"{field}.owner"),
        snapshot_id=_bytes(v[4], f"{field}.snapshot_id", SESSION_ID_BYTES, SESSION_ID_BYTES),
        issued_at_us=_int(v[5], f"{field}.issued_at_us", 0, MAX_SEQ_EXCLUSIVE - 1),
        model=_model(dict(zip(MODEL_FIELDS, v[6:], strict=True)),
                     lambda name: f"{field}.{name}"),
    )


def _signed_description(v: Fields, name: Namer) -> tuple[bytes, bytes, SnapshotDescription]:
    description = _bytes(v["description"], name("description"), 1, MAX_DESCRIPTION_BYTES)
    described = decode_description(description, name("description"))
    signature = _bytes(v["owner_signature"], name("owner_signature"), SIGNATURE_BYTES,
                       SIGNATURE_BYTES)
    return description, signature, described


def snapshot_share_bytes(classes: int, features: int) -> int:
    """The exact length of SNAPSHOT_SHARE.sealed for a C x D layer."""
    elements = classes * features + classes
    return SEAL_OVERHEAD_BYTES + MASK_SEED_BYTES + FIELD_ELEMENT_BYTES * elements


def _rows_sealed(value: object, field: str, rows: int) -> bytes:
    sealed = _bytes(value, field, SEAL_OVERHEAD_BYTES + FIELD_ELEMENT_BYTES, MAX_SEALED_BYTES)
    payload = len(sealed) - SEAL_OVERHEAD_BYTES
    if payload % (FIELD_ELEMENT_BYTES * rows):
        raise FieldError(f"{payload} bytes are not {rows} rows of field elements", field)
    return sealed


def decode_snapshot_share(v: Fields, sender: str, name: Namer) -> SnapshotShare:
    recipient = _peer_id(v["recipient"], name("recipient"))
    description, signature, described = _signed_description(v, name)
    model = described.model
    if recipient not in model.servers:
        raise FieldError("the recipient is not one of the servers", name("recipient"))
    if described.owner != sender:
        raise FieldError("a snapshot share comes from its owner", name("description"))
    size = snapshot_share_bytes(model.classes, model.features)
    certificate = _bytes(v["certificate"], name("certificate"), 1, MAX_CERTIFICATE_BYTES)
    return SnapshotShare(recipient=recipient, certificate=certificate, description=description,
                         owner_signature=signature,
                         sealed=_bytes(v["sealed"], name("sealed"), size, size))


def decode_serve(v: Fields, sender: str, name: Namer) -> Serve:
    certificate = _bytes(v["certificate"], name("certificate"), 1, MAX_CERTIFICATE_BYTES)
    owner_certificate = _bytes(v["owner_certificate"], name("owner_certificate"), 1,
                               MAX_CERTIFICATE_BYTES)
    description, signature, described = _signed_description(v, name)
    if sender not in described.model.servers:
        raise FieldError("a SERVE comes from one of its servers", name("servers"))
    return Serve(certificate=certificate, owner_certificate=owner_certificate,
                 description=description, owner_signature=signature)


def decode_query(v: Fields, sender: str, name: Namer) -> Query:
    rows = _int(v["rows"], name("rows"), 1, MAX_QUERY_ROWS)
    return Query(
        recipient=_peer_id(v["recipient"], name("recipient")),
        certificate=_bytes(v["certificate"], name("certificate"), 1, MAX_CERTIFICATE_BYTES),
        counter=_int(v["counter"], name("counter"), 0, MAX_SEQ_EXCLUSIVE - 1),
        rows=rows,
        sealed=_rows_sealed(v["sealed"], name("sealed"), rows),
    )


def decode_answer(v: Fields, sender: str, name: Namer) -> Answer:
    rows = _int(v["rows"], name("rows"), 1, MAX_QUERY_ROWS)
    return Answer(
        recipient=_peer_id(v["recipient"], name("recipient")),
        counter=_int(v["counter"], name("counter"), 0, MAX_SEQ_EXCLUSIVE - 1),
        rows=rows,
        sealed=_rows_sealed(v["sealed"], name("sealed"), rows),
    )
