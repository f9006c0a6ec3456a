"""The prime field of the secret sharing, and fixed-point encoding of real vectors into it.

Field: integers modulo the Mersenne prime ``PRIME = 2**31 - 1``. Elements are stored as
``uint32`` (``FIELD_DTYPE``) and travel as 4 little-endian bytes each (``FIELD_BYTES``).
Why this prime: it fits 4 bytes on the wire (half the traffic of a 61-bit field), the sum of two
elements fits a ``uint32`` so modular addition is three wrap-around ``uint32`` operations
(``c = a + b; c = min(c, c - p)``), and the product of two elements fits a ``uint64`` so the
Lagrange step needs no big integers. Its drawback is the range of the fixed-point encoding,
which ``FixedPoint`` makes explicit and checks.

Fixed point: a real ``x`` is encoded as ``round(x * 2**frac_bits) mod p`` and decoded by the
centered lift (field elements above ``(p-1)/2`` are negative). A sum of up to ``max_summands``
encoded values whose magnitudes are each at most ``max_abs`` decodes exactly to the sum of the
rounded values; ``encode`` refuses (EncodingRangeError) anything larger, and NaN / Inf, rather
than let a sum wrap around silently. Round-trip error is at most ``2**-(frac_bits + 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crypto.errors import EncodingRangeError

PRIME: int = 2**31 - 1
FIELD_DTYPE = np.uint32
FIELD_BYTES: int = 4
#: largest field element whose centered lift is non-negative
HALF_PRIME: int = (PRIME - 1) // 2

_P32 = np.uint32(PRIME)
_SHIFT30 = np.uint32(30)
_NEGATE_OFFSET = np.uint32(2**31 + 1)  # -p mod 2**32
_WIRE_DTYPE = np.dtype("<u4")
#: elements per block in the blocked loops below: keeps temporaries in the L2 cache
BLOCK = 1 << 16


def mod_add_into(acc: np.ndarray, other: np.ndarray, scratch: np.ndarray | None = None) -> None:
    """``acc = (acc + other) mod p`` in place, for canonical uint32 field arrays.

    Why it is correct: a, b < p < 2**31, so a + b < 2**32 does not overflow; if a + b >= p then
    a + b - p is smaller, otherwise the subtraction wraps to a huge value; the minimum picks the
    canonical representative.
    """
    if acc.shape != other.shape:
        raise ValueError(f"cannot add field arrays of shapes {acc.shape} and {other.shape}")
    size = acc.shape[0]
    if scratch is None or scratch.shape[0] < min(size, BLOCK):
        scratch = np.empty(min(size, BLOCK), dtype=FIELD_DTYPE)
    for start in range(0, size, BLOCK):
        stop = min(start + BLOCK, size)
        a = acc[start:stop]
        tmp = scratch[: stop - start]
        np.add(a, other[start:stop], out=a)
        np.subtract(a, _P32, out=tmp)
        np.minimum(a, tmp, out=a)


def check_field(a: np.ndarray, what: str = "field array") -> np.ndarray:
    """Return ``a`` if it is a 1-D uint32 array of canonical elements, else ValueError."""
    if not isinstance(a, np.ndarray) or a.dtype != FIELD_DTYPE or a.ndim != 1:
        raise ValueError(f"{what} must be a 1-D {np.dtype(FIELD_DTYPE).name} array")
    if a.size and int(a.max()) >= PRIME:
        raise ValueError(f"{what} holds an element >= PRIME")
    return a


def field_to_bytes(a: np.ndarray) -> bytes:
    """Little-endian wire bytes of a canonical field array (ValueError if not canonical)."""
    check_field(a)
    return a.astype(_WIRE_DTYPE, copy=False).tobytes()


def field_view(a: np.ndarray) -> memoryview:
    """Zero-copy little-endian byte view of a canonical field array (same bytes as
    ``field_to_bytes``), for handing a multi-megabyte share to ``seal`` without a copy."""
    check_field(a)
    wire = np.ascontiguousarray(a.astype(_WIRE_DTYPE, copy=False))
    return memoryview(wire).cast("B")


def field_from_bytes(b: bytes) -> np.ndarray:
    """Parse wire bytes into a read-only uint32 field array.

    ValueError if the length is not a multiple of FIELD_BYTES or an element is >= PRIME, so a
    malicious sender cannot smuggle non-canonical values that would bias a sum.
    """
    if len(b) % FIELD_BYTES:
        raise ValueError(f"field bytes length {len(b)} is not a multiple of {FIELD_BYTES}")
    a = np.frombuffer(b, dtype=_WIRE_DTYPE).astype(FIELD_DTYPE, copy=False)
    if a.size and int(a.max()) >= PRIME:
        raise ValueError("field bytes hold an element >= PRIME")
    return a


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point code with ``frac_bits`` fractional bits, safe for ``max_summands`` summands."""

    frac_bits: int = 16
    max_summands: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 30:
            raise ValueError("frac_bits must be in [0, 30]")
        if self.max_summands < 1:
            raise ValueError("max_summands must be >= 1")
        if self.max_int < 1:
            raise ValueError("frac_bits/max_summands leave no representable range")

    @property
    def max_int(self) -> int:
        """Largest |rounded integer| per value such that max_summands of them cannot wrap."""
        return HALF_PRIME // self.max_summands

    @property
    def max_abs(self) -> float:
        """Largest |x| accepted by :meth:`encode`."""
        return self.max_int / 2.0**self.frac_bits

    def _limit(self, dtype: np.dtype) -> np.floating:
        # The bound must hold in the input's own precision: float32(max_abs) may round *up*
        # (e.g. to 1024.0), which would let through a value whose code exceeds max_int.
        limit = np.asarray(self.max_abs, dtype=dtype)
        if float(limit) > self.max_abs:
            limit = np.nextafter(limit, np.asarray(0, dtype=dtype))
        return limit[()]

    def encode(self, values: np.ndarray) -> np.ndarray:
        """float -> canonical uint32 field elements (1-D copy of the flattened input).

        Raises EncodingRangeError on NaN/Inf or |x| > max_abs.
        """
        x = np.asarray(values)
        if x.dtype.kind != "f":
            x = x.astype(np.float64)
        x = x.reshape(-1)
        if x.size:
            limit = self._limit(x.dtype)
            low, high = x.min(), x.max()  # NaN propagates into both
            if not (np.isfinite(low) and np.isfinite(high)):
                raise EncodingRangeError("cannot encode NaN or infinite values")
            if low < -limit or high > limit:
                bad = max(abs(float(low)), abs(float(high)))
                raise EncodingRangeError(
                    f"|value| {bad:.6g} exceeds max_abs {self.max_abs:.6g} "
                    f"(frac_bits={self.frac_bits}, max_summands={self.max_summands})"
                )
        out = np.empty(x.size, dtype=FIELD_DTYPE)
        scale = x.dtype.type(2.0**self.frac_bits)
        scaled = np.empty(min(x.size, BLOCK), dtype=x.dtype)
        codes = np.empty(min(x.size, BLOCK), dtype=np.int32)
        for start in range(0, x.size, BLOCK):
            stop = min(start + BLOCK, x.size)
            m = stop - start
            # Multiplying by a power of two is exact, so rint is the only rounding.
            np.multiply(x[start:stop], scale, out=scaled[:m])
            np.rint(scaled[:m], out=scaled[:m])
            # |code| <= max_int < 2**30 after the range check, so int32 holds it exactly.
            codes[:m] = scaled[:m]
            as_unsigned = codes[:m].view(np.uint32)
            block = out[start:stop]
            # negative v is 2**32 + v as uint32; v + p (mod 2**32) is then the canonical
            # element, and for v >= 0 the plain value is the smaller of the two.
            np.add(as_unsigned, _P32, out=block)
            np.minimum(block, as_unsigned, out=block)
        return out

    def decode(self, field_values: np.ndarray) -> np.ndarray:
        """Canonical field elements -> float64 by the centered lift (ValueError otherwise)."""
        a = check_field(np.asarray(field_values).reshape(-1), "field values")
        out = np.empty(a.size, dtype=np.float64)
        scale = 1.0 / 2.0**self.frac_bits
        signed = np.empty(min(a.size, BLOCK), dtype=FIELD_DTYPE)
        for start in range(0, a.size, BLOCK):
            stop = min(start + BLOCK, a.size)
            v, s = a[start:stop], signed[: stop - start]
            # v > (p-1)/2 <=> bit 30 is set (v < 2**31). For those, v - p = v + 2**31 + 1
            # (mod 2**32), which read as int32 is the negative value of the centered lift.
            np.right_shift(v, _SHIFT30, out=s)
            np.multiply(s, _NEGATE_OFFSET, out=s)
            np.add(s, v, out=s)
            np.multiply(s.view(np.int32), scale, out=out[start:stop])
        return out
