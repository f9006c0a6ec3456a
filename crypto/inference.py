"""Private predictions of a linear layer on Shamir shares (docs/inference.md).

The model owner encodes a linear layer ``W`` (C x D), ``b`` (C) as fixed-point field codes
(:func:`encode_snapshot`) and Shamir-shares them with threshold t (:func:`share_snapshot`).
A client encodes and shares its feature rows the same way (:func:`share_features`). Serving
peer i computes ``h(i) = X(i) W(i)^T + b(i) + Z(i)`` on its shares alone
(:func:`product_share`), where ``Z`` is a random polynomial of degree 2(t - 1) with
``Z(0) = 0`` that every serving peer derives from the snapshot's mask seed
(:func:`zero_mask`). The client interpolates ``h`` at 0 from 2t - 1 points
(:func:`reconstruct_logits`).

Security properties:

* Any t - 1 shares of the weights, or of a feature row, are jointly uniform and independent of
  the secret (``crypto.shamir``), so fewer than t serving peers learn nothing of either.
* The 2t - 1 product shares the client receives determine ``h + Z`` at 0 (the logits) and
  nothing else: ``Z``'s coefficients are uniform to anyone without the mask seed, which only
  the owner and the serving peers hold, and they are fresh for every (snapshot, client,
  counter, row), so the higher coefficients of ``h`` (which mix the weights with the
  sharing's fixed randomness) never reach the client.
* Exactness: the logit is the integer ``L = Σ_d qW_cd qx_d + qb_c`` at scale
  ``2^(frac_w + frac_x)``; the field returns it exactly when ``|L| <= (p - 1) / 2``. The owner
  refuses a snapshot whose weights could exceed that for a row of norm at most
  ``feature_norm_bound`` (Cauchy-Schwarz), and the client refuses a row above that bound, so no
  answer can wrap around (:class:`~crypto.errors.EncodingRangeError`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from crypto.errors import CryptoError, EncodingRangeError
from crypto.field import FIELD_DTYPE, HALF_PRIME, PRIME, FixedPoint, field_to_bytes
from crypto.masking import SEED_BYTES, expand_field
from crypto.shamir import Share, reconstruct, split

SNAPSHOT_DOMAIN = b"murmur/v1/snapshot\x00"
MASK_DOMAIN = b"murmur/v1/inference-mask\x00"
#: Most features per row: keeps a sum of D products of a 31-bit and a 16-bit value below 2**64.
MAX_FEATURES = 1 << 16
#: Most classes of a served model.
MAX_CLASSES = 1 << 10
CONTENT_HASH_BYTES = 32
_P64 = np.uint64(PRIME)
_LOW16 = np.uint64(0xFFFF)
_SHIFT16 = np.uint64(16)


class InconsistentAnswersError(CryptoError):
    """More than 2t - 1 product shares arrived and they do not lie on one polynomial of degree
    2(t - 1): a serving peer answered wrongly (or from another snapshot)."""


class FeatureRangeError(EncodingRangeError):
    """A feature row's fixed-point norm exceeds the snapshot's bound, so its logits could wrap."""


@dataclass(frozen=True)
class SnapshotParams:
    """The public parameters of a serving snapshot (every party may know them)."""

    classes: int
    features: int
    frac_w: int = 14
    frac_x: int = 8
    #: bound on ‖qx‖₂ of a feature row, in codes (scale 2**frac_x)
    feature_norm_bound: int = 0
    #: rows a serving peer answers per client for this snapshot
    max_rows_per_client: int = 1000

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= MAX_CLASSES:
            raise ValueError(f"classes must be in 2..{MAX_CLASSES}")
        if not 1 <= self.features <= MAX_FEATURES:
            raise ValueError(f"features must be in 1..{MAX_FEATURES}")
        if not (0 <= self.frac_w <= 20 and 0 <= self.frac_x <= 20):
            raise ValueError("frac_w and frac_x must be in 0..20")
        if not 1 <= self.feature_norm_bound <= HALF_PRIME:
            raise ValueError("feature_norm_bound must be in 1..(p-1)/2")
        if self.max_rows_per_client < 0:
            raise ValueError("max_rows_per_client must be >= 0")

    @classmethod
    def for_unit_variance(cls, classes: int, features: int, **kwargs: int) -> SnapshotParams:
        """Parameters for features normalised to variance <= 1 (‖x‖₂ <= √D), with 1 % margin."""
        frac_x = kwargs.get("frac_x", 8)
        bound = int(np.ceil(1.01 * np.sqrt(features) * 2.0**frac_x))
        return cls(classes=classes, features=features, feature_norm_bound=bound, **kwargs)

    @property
    def logit_scale(self) -> float:
        return 2.0 ** (self.frac_w + self.frac_x)

    @property
    def weight_elements(self) -> int:
        """Field elements of one snapshot share: C x D weights then C biases."""
        return self.classes * self.features + self.classes

    def packed(self) -> bytes:
        return struct.pack(">HIBBQQ", self.classes, self.features, self.frac_w, self.frac_x,
                           self.feature_norm_bound, self.max_rows_per_client)


@dataclass(frozen=True)
class SnapshotCodes:
    """The fixed-point codes of one snapshot: ``codes`` = W row-major then b, and its hash."""

    params: SnapshotParams
    codes: np.ndarray
    content_hash: bytes


def _fixed(frac_bits: int) -> FixedPoint:
    return FixedPoint(frac_bits=frac_bits, max_summands=1)


def encode_snapshot(weights: np.ndarray, bias: np.ndarray, params: SnapshotParams) -> SnapshotCodes:
    """Fixed-point codes of ``weights`` (C x D) and ``bias`` (C) with the content hash.

    EncodingRangeError if a value is not finite or if some class's logit could leave the
    field's range for a feature row within ``params.feature_norm_bound``.
    """
    w = np.asarray(weights, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    if w.shape != (params.classes, params.features) or b.shape != (params.classes,):
        raise ValueError(f"need weights {(params.classes, params.features)} and bias "
                         f"({params.classes},), got {w.shape} and {b.shape}")
    w_codes = _fixed(params.frac_w).encode(w)
    b_codes = _fixed(params.frac_w + params.frac_x).encode(b)
    qw = np.rint(w * 2.0**params.frac_w)
    qb = np.rint(b * params.logit_scale)
    worst = np.sqrt((qw * qw).sum(axis=1)) * params.feature_norm_bound + np.abs(qb)
    if float(worst.max()) > HALF_PRIME:
        raise EncodingRangeError(
            f"a logit could reach {float(worst.max()) / params.logit_scale:.4g}, beyond the "
            f"field's {HALF_PRIME / params.logit_scale:.4g} at frac_w={params.frac_w}, "
            f"frac_x={params.frac_x}: lower the fraction bits")
    codes = np.concatenate([w_codes, b_codes])
    digest = hashlib.blake2b(SNAPSHOT_DOMAIN + params.packed() + field_to_bytes(codes),
                             digest_size=CONTENT_HASH_BYTES).digest()
    return SnapshotCodes(params=params, codes=codes, content_hash=digest)


def fit_snapshot(weights: np.ndarray, bias: np.ndarray, *, frac_x: int = 8,
                 max_rows_per_client: int = 1000) -> SnapshotCodes:
    """The snapshot of a layer for unit-variance features with the most weight fraction bits
    (16 down to 4) that keep every logit inside the field; EncodingRangeError if none does."""
    classes, features = np.shape(weights)
    for frac_w in range(16, 3, -1):
        params = SnapshotParams.for_unit_variance(
            classes, features, frac_w=frac_w, frac_x=frac_x,
            max_rows_per_client=max_rows_per_client)
        try:
            return encode_snapshot(weights, bias, params)
        except EncodingRangeError:
            continue
    raise EncodingRangeError("the layer's weights are too large for the field at any "
                             "fraction bits >= 4")


def share_snapshot(snapshot: SnapshotCodes, *, n: int, t: int) -> list[Share]:
    """``n`` Shamir shares (threshold ``t``) of the snapshot's codes; needs n >= 2t - 1."""
    if n < 2 * t - 1:
        raise ValueError(f"{n} serving peers cannot answer at threshold {t}: need 2t - 1 = "
                         f"{2 * t - 1} product shares")
    return split(snapshot.codes, n=n, t=t)


def encode_features(rows: np.ndarray, params: SnapshotParams) -> np.ndarray:
    """Fixed-point codes (rows x D, uint32) of feature rows; FeatureRangeError above the bound."""
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != params.features:
        raise ValueError(f"need feature rows of width {params.features}, got {x.shape}")
    codes = _fixed(params.frac_x).encode(x).reshape(x.shape)
    q = np.rint(x * 2.0**params.frac_x)
    norms = np.sqrt((q * q).sum(axis=1))
    if norms.size and float(norms.max()) > params.feature_norm_bound:
        raise FeatureRangeError(f"a feature row has norm {float(norms.max()):.0f} codes, above "
                                f"the snapshot's bound {params.feature_norm_bound}")
    return codes


def share_features(codes: np.ndarray, *, n: int, t: int) -> list[Share]:
    """``n`` shares of a rows x D code matrix; each share's ``values`` is flat (rows * D)."""
    return split(np.ascontiguousarray(codes.reshape(-1)), n=n, t=t)


def _mat_mul_mod(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``rows @ weights.T mod p`` for canonical field matrices (R x D, C x D), D <= 2**16.

    The weights are split into 16-bit halves so every partial sum stays below 2**64:
    D * (2**31 * 2**16) < 2**64.
    """
    x = rows.astype(np.uint64)
    w = weights.astype(np.uint64)
    low = (x @ (w & _LOW16).T) % _P64
    high = (x @ (w >> _SHIFT16).T) % _P64
    return ((high << _SHIFT16) % _P64 + low) % _P64


def zero_mask(seed: bytes, snapshot_id: bytes, client: str, counter: int, *, rows: int,
              classes: int, t: int, point: int) -> np.ndarray:
    """The point ``point`` of a random polynomial of degree 2(t - 1) with value 0 at 0, one per
    (row, class), keyed by the mask seed and (snapshot, client, counter, rows, classes, t).
    Every serving peer of a snapshot derives the same polynomial; only the seed's holders can.

    The shape is part of the key: the coefficients are laid out in the keystream by
    (coefficient, row, class), so two queries of one counter with different row counts (a
    client may send each serving peer a different ``rows``) would otherwise reuse keystream
    words as different coefficients, and their answers would have a mask-free combination.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seed must be {SEED_BYTES} bytes")
    degree = 2 * (t - 1)
    raw = client.encode("ascii")
    key = hashlib.blake2b(MASK_DOMAIN + snapshot_id + bytes([len(raw)]) + raw
                          + struct.pack(">QIII", counter, rows, classes, t),
                          key=seed, digest_size=SEED_BYTES).digest()
    coefficients = expand_field(key, degree * rows * classes).reshape(degree, rows * classes)
    out = np.zeros(rows * classes, dtype=np.uint64)
    power = 1
    for k in range(degree):
        power = power * point % PRIME
        out = (out + coefficients[k].astype(np.uint64) * np.uint64(power)) % _P64
    return out.astype(FIELD_DTYPE).reshape(rows, classes)


def product_share(weight_share: Share, feature_share: Share, params: SnapshotParams, *,
                  mask: np.ndarray) -> Share:
    """Serving peer's product share: ``X(i) W(i)^T + b(i) + Z(i)`` (rows x C, flat)."""
    if weight_share.x != feature_share.x:
        raise ValueError("weight and feature shares are at different points")
    c, d = params.classes, params.features
    if weight_share.values.shape != (params.weight_elements,):
        raise ValueError("weight share does not match the snapshot's shape")
    if feature_share.values.size % d:
        raise ValueError(f"feature share is not whole rows of {d}")
    x = feature_share.values.reshape(-1, d)
    w = weight_share.values[: c * d].reshape(c, d)
    out = _mat_mul_mod(x, w)
    out = (out + weight_share.values[c * d:].astype(np.uint64)) % _P64
    out = (out + mask.astype(np.uint64)) % _P64
    return Share(x=weight_share.x, values=out.astype(FIELD_DTYPE).reshape(-1))


def _shifted(shares: list[Share], at: int) -> list[Share]:
    return [Share(x=(s.x - at) % PRIME, values=s.values) for s in shares]


def reconstruct_logits(answers: Mapping[int, np.ndarray], params: SnapshotParams, *,
                       t: int) -> np.ndarray:
    """The logits (rows x C, float64) from product shares keyed by point.

    Needs 2t - 1 points (ValueError otherwise). With more, every further point must lie on the
    polynomial the first 2t - 1 define (InconsistentAnswersError otherwise).
    """
    need = 2 * t - 1
    shares = [Share(x=x, values=np.ascontiguousarray(v.reshape(-1)))
              for x, v in sorted(answers.items())]
    if len(shares) < need:
        raise ValueError(f"need {need} product shares, got {len(shares)}")
    base = shares[:need]
    for extra in shares[need:]:
        if not np.array_equal(reconstruct(_shifted(base, extra.x), t=need), extra.values):
            raise InconsistentAnswersError(
                f"the answer at point {extra.x} is not on the other answers' polynomial")
    codes = reconstruct(base, t=need)
    logits = _fixed(0).decode(codes) / params.logit_scale
    return logits.reshape(-1, params.classes)


def fixed_point_logits(snapshot: SnapshotCodes, rows: np.ndarray) -> np.ndarray:
    """The plaintext fixed-point logits ``(Σ qW qx + qb) / 2^(frac_w + frac_x)``, with the same
    integer arithmetic as the private path but in the clear (for checks and benchmarks)."""
    params = snapshot.params
    c, d = params.classes, params.features
    signed = _fixed(0).decode(snapshot.codes).astype(np.int64)
    q = np.rint(np.asarray(rows, dtype=np.float64) * 2.0**params.frac_x).astype(np.int64)
    total = q @ signed[: c * d].reshape(c, d).T + signed[c * d:]
    return total / params.logit_scale
