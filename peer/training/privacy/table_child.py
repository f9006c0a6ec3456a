"""The epsilon table's child process: one request on stdin, one JSON reply on stdout.

Run by :class:`.table.EpsilonTable` as ``python -m peer.training.privacy.table_child``. It
imports the accountant's library (dp-accounting, scipy) and never torch, computes what was
asked with the same functions an in-process ledger calls, and exits, so the peer's own
process never holds the library. Requests:

* ``{"kind": "epsilons", "key": TableKey.text(), "steps": [n, ...]}`` ->
  ``{"key": ..., "steps": [...], "epsilons": [...], "rdp": [...]}`` (the request's key and
  counts echoed, so the parent can check what was answered):
  ``epsilon_of_segments(prefix + [(sigma, q, n)])`` for each n. For PLD, RDP's figure for
  the same composition is the cross-check: a PLD figure above RDP's by more than
  :data:`PLD_SLACK` fails the request (exit status 3).
* ``{"kind": "sigma", "target_epsilon", "delta", "sample_rate", "steps", "accountant"}`` ->
  ``{"sigma": ...}``: the accountant's ``sigma_for``.

Every request carries the parent's ``method`` (:func:`.table_key.method_fingerprint`); a child
whose own differs (other accountant code or library versions than the parent's) refuses it.
Bad requests exit with status 2 and a message on stderr.
"""

from __future__ import annotations

import json
import sys

from peer.training.privacy import accountant as accountants
from peer.training.privacy.base import AccountingError
from peer.training.privacy.table_key import TableKey, method_fingerprint

#: How far PLD's epsilon may exceed RDP's before the cross-check fails: PLD's pessimistic
#: 1e-3 discretization can put it above RDP below epsilon ~0.005 (docs/privacy.md).
PLD_SLACK = 1e-2


def epsilons(key: TableKey, counts: list[int]) -> dict[str, list[float]]:
    """The accountant's figure, and RDP's, for the key's composition at each count."""
    figures, rdp = [], []
    for n in counts:
        if int(n) < 1:
            raise AccountingError(f"step count must be >= 1, got {n}")
        segments = [*key.prefix, (key.sigma, key.sample_rate, int(n))]
        figure = accountants.epsilon_of_segments(segments, key.delta, key.accountant)
        check = accountants.epsilon_of_segments(segments, key.delta, "rdp")
        if key.accountant == "pld" and figure > check + PLD_SLACK:
            print(f"cross-check failed: PLD epsilon {figure} > RDP {check} for {segments}",
                  file=sys.stderr)
            raise SystemExit(3)
        figures.append(figure)
        rdp.append(check)
    return {"epsilons": figures, "rdp": rdp}


def answer(request: dict[str, object]) -> dict[str, object]:
    if request.get("method") != method_fingerprint():
        raise AccountingError("the parent's accountant code or library versions differ from "
                              "this child's (method fingerprint)")
    kind = request.get("kind")
    if kind == "epsilons":
        steps = request["steps"]
        if not isinstance(steps, list) or not all(type(n) is int for n in steps):
            raise AccountingError("steps must be a list of integers")
        key = TableKey.from_text(str(request["key"]))
        return {"key": key.text(), "steps": steps, **epsilons(key, steps)}
    if kind == "sigma":
        sigma = accountants.sigma_for(
            float(request["target_epsilon"]), float(request["delta"]),  # type: ignore[arg-type]
            float(request["sample_rate"]), int(request["steps"]),  # type: ignore[arg-type]
            str(request["accountant"]))
        return {"sigma": float(sigma)}
    raise AccountingError(f"unknown request kind {kind!r}")


def main() -> int:
    try:
        request = json.loads(sys.stdin.read())
        if not isinstance(request, dict):
            raise AccountingError("the request must be a JSON object")
        reply = answer(request)
    except (AccountingError, ValueError, KeyError, TypeError) as exc:
        print(f"bad epsilon table request: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
