"""The session kinds a node can run, behind one small interface (``[session] kind``).

The node (peer/network/node.py) owns the I/O: topics, signing, subscriptions, merging and
events. What differs between session kinds is only how a session is made, how signed wire
messages reach its state machine and what its steps put on the wire; a
:class:`SessionDriver` does exactly that, so node.py holds no per-kind branches.
:data:`SESSION_DRIVERS` maps the config name to the class (the registry style of
peer/sharing/): a new session kind is one class and one line here.

* ``"shamir"`` (default): :class:`peer.network.session.shamir.Session`, Shamir shares and partial
  sums on direct topics (docs/sessions.md).
* ``"masked"``: :class:`peer.network.session.masked.MaskedSession`, one masked vector per
  member on the session topic (docs/design/masked-sessions.md, "In the node").

Security property of the split: peers of different kinds never form a session together. A
driver's :meth:`SessionDriver.model_id` is the id the peer announces, samples invitees by and
requires in every INVITE (``check_invite``), and the masked kind's carries a ``-masked``
suffix, so a Shamir peer neither invites nor accepts a masked peer, and the other way round.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from peer.network.session import masked_messages as mm
from peer.network.session.masked import MaskedPhase, MaskedSession
from peer.network.session.masked_messages import (
    MaskedHeader,
    MaskedKind,
    MaskedStep,
    MaskedTimeouts,
)
from peer.network.session.shamir import (
    Contribution,
    Phase,
    Session,
    SessionContext,
    SessionParams,
    SessionTimeouts,
    Step,
)
from peer.network.settings import NodeConfig
from protocol import messages as m
from protocol.topics import session_filter

#: A session of any kind (the node keeps the state machine itself; tests read its members).
AnySession = Session | MaskedSession

#: The masked state machine's kinds on the wire (MaskedKind stays local to it).
WIRE_KIND: dict[MaskedKind, m.Kind] = {
    MaskedKind.INVITE: m.Kind.INVITE,
    MaskedKind.ACCEPT: m.Kind.MASKED_ACCEPT,
    MaskedKind.START: m.Kind.MASKED_START,
    MaskedKind.KEYS: m.Kind.KEYS,
    MaskedKind.MASKED: m.Kind.MASKED,
    MaskedKind.SURVIVORS: m.Kind.SURVIVORS,
    MaskedKind.CONFIRM: m.Kind.CONFIRM,
    MaskedKind.REVEAL: m.Kind.REVEAL,
    MaskedKind.ABORT: m.Kind.ABORT,
}
_LOCAL_KIND = {wire: local for local, wire in WIRE_KIND.items()}

#: Appended to the model id in masked mode (after the sharing strategy's own suffix).
MASKED_MODEL_SUFFIX = "-masked"


@dataclass(frozen=True)
class WireOut:
    """A message to sign and publish: direct to ``recipient``, or on the sender's session
    topic of the session when ``recipient`` is None."""

    recipient: str | None
    kind: m.Kind
    body: m.Body
    seq: int


@dataclass
class DriverStep:
    """What one session event produced, in wire terms: messages and refused-input reasons."""

    out: list[WireOut] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)


class SessionDriver(ABC):
    """Makes and drives sessions of one kind for a node; stateless between calls."""

    name: ClassVar[str]

    @classmethod
    def from_config(cls, config: NodeConfig) -> SessionDriver:
        return cls()

    def model_id(self, base: str) -> str:
        """The model id this peer announces and groups by: ``base`` plus the kind's suffix."""
        return base

    def check_invite(self, params: SessionParams, invite: m.Invite) -> str | None:
        """Why an INVITE must be declined on protocol grounds (None if acceptable)."""
        return Session.check_invite(params, invite)

    def session_filter(self, network: str, session: AnySession) -> str | None:
        """The subscription a session needs from its first message to its end (None: none)."""
        return None

    @abstractmethod
    def initiate(self, ctx: SessionContext, session_id: bytes, contribution: Contribution,
                 invitees: list[str], now: float) -> tuple[AnySession, DriverStep]: ...

    @abstractmethod
    def join(self, ctx: SessionContext, header: m.Header, invite: m.Invite,
             contribution: Contribution, now: float) -> tuple[AnySession, DriverStep]: ...

    @abstractmethod
    def handle(self, session: AnySession, header: m.Header, body: m.Body,
               now: float) -> DriverStep:
        """Feed one authenticated message of ``session`` (the inbound checks passed)."""

    @abstractmethod
    def on_timeout(self, session: AnySession, now: float) -> DriverStep: ...

    @abstractmethod
    def abort(self, session: AnySession, reason: str) -> DriverStep: ...

    @abstractmethod
    def inviting(self, session: AnySession) -> bool:
        """Whether the session is still collecting answers (it may yield to another invite)."""


class ShamirDriver(SessionDriver):
    """The Shamir session (peer/network/session/shamir.py); its messages are wire messages
    already."""

    name = "shamir"

    @staticmethod
    def _wire(step: Step) -> DriverStep:
        return DriverStep([WireOut(o.recipient, o.kind, o.body, o.seq) for o in step.out],
                          list(step.drops))

    def initiate(self, ctx: SessionContext, session_id: bytes, contribution: Contribution,
                 invitees: list[str], now: float) -> tuple[AnySession, DriverStep]:
        session, step = Session.initiate(ctx, session_id, contribution, invitees, now)
        return session, self._wire(step)

    def join(self, ctx: SessionContext, header: m.Header, invite: m.Invite,
             contribution: Contribution, now: float) -> tuple[AnySession, DriverStep]:
        session, step = Session.join(ctx, header, invite, contribution, now)
        return session, self._wire(step)

    def handle(self, session: AnySession, header: m.Header, body: m.Body,
               now: float) -> DriverStep:
        assert isinstance(session, Session)
        return self._wire(session.handle(header, body, now))

    def on_timeout(self, session: AnySession, now: float) -> DriverStep:
        assert isinstance(session, Session)
        return self._wire(session.on_timeout(now))

    def abort(self, session: AnySession, reason: str) -> DriverStep:
        assert isinstance(session, Session)
        return self._wire(session.abort(reason))

    def inviting(self, session: AnySession) -> bool:
        return isinstance(session, Session) and session.phase is Phase.INVITING


def masked_timeouts_from(timeouts: SessionTimeouts) -> MaskedTimeouts:
    """The masked phases' timeouts from the Shamir ones: share_s bounds KEYS and MASKED,
    partial_s bounds CONFIRM and REVEAL, and an invitee waits for SURVIVORS as long as the
    initiator collects MASKED plus one CONFIRM phase (the initiator may mask last)."""
    return MaskedTimeouts(
        invite_s=timeouts.invite_s, start_s=timeouts.start_s, keys_s=timeouts.share_s,
        masked_s=timeouts.share_s, survivors_s=timeouts.share_s + timeouts.partial_s,
        confirm_s=timeouts.partial_s, reveal_s=timeouts.partial_s,
    )


class MaskedDriver(SessionDriver):
    """Masked sessions (peer/network/session/masked.py) translated to and from the wire.

    A DECLINE reaches the state machine as the ABORT it is equivalent to there (an invitee's
    ABORT while the initiator is inviting is its decline); a wire kind the masked session does
    not speak (SHARE, PARTIAL, the Shamir ACCEPT and START) is a counted ``unexpected_kind``.
    """

    name = "masked"

    def __init__(self, timeouts: MaskedTimeouts) -> None:
        self.timeouts = timeouts

    @classmethod
    def from_config(cls, config: NodeConfig) -> SessionDriver:
        return cls(config.masked_timeouts or masked_timeouts_from(config.timeouts))

    def model_id(self, base: str) -> str:
        return base + MASKED_MODEL_SUFFIX

    def session_filter(self, network: str, session: AnySession) -> str | None:
        return session_filter(network, session.session_id)

    @staticmethod
    def _wire(step: MaskedStep) -> DriverStep:
        return DriverStep([WireOut(o.recipient, WIRE_KIND[o.kind], o.body, o.seq)
                           for o in step.out], list(step.drops))

    @staticmethod
    def _local(header: m.Header, body: m.Body) -> tuple[MaskedHeader, mm.MaskedBody] | None:
        if header.kind is m.Kind.DECLINE:
            assert isinstance(body, m.Decline)
            local, body = MaskedKind.ABORT, m.Abort(body.reason)
        elif header.kind in _LOCAL_KIND:
            local = _LOCAL_KIND[header.kind]
        else:
            return None
        return MaskedHeader(local, header.sender, header.session, header.seq), body  # type: ignore[return-value]

    def initiate(self, ctx: SessionContext, session_id: bytes, contribution: Contribution,
                 invitees: list[str], now: float) -> tuple[AnySession, DriverStep]:
        session, step = MaskedSession.initiate(ctx, session_id, contribution, invitees, now,
                                               self.timeouts)
        return session, self._wire(step)

    def join(self, ctx: SessionContext, header: m.Header, invite: m.Invite,
             contribution: Contribution, now: float) -> tuple[AnySession, DriverStep]:
        local = MaskedHeader(MaskedKind.INVITE, header.sender, header.session, header.seq)
        session, step = MaskedSession.join(ctx, local, invite, contribution, now, self.timeouts)
        return session, self._wire(step)

    def handle(self, session: AnySession, header: m.Header, body: m.Body,
               now: float) -> DriverStep:
        assert isinstance(session, MaskedSession)
        local = self._local(header, body)
        if local is None:
            return DriverStep(drops=["unexpected_kind"])
        return self._wire(session.handle(local[0], local[1], now))

    def on_timeout(self, session: AnySession, now: float) -> DriverStep:
        assert isinstance(session, MaskedSession)
        return self._wire(session.on_timeout(now))

    def abort(self, session: AnySession, reason: str) -> DriverStep:
        assert isinstance(session, MaskedSession)
        return self._wire(session.abort(reason))

    def inviting(self, session: AnySession) -> bool:
        return isinstance(session, MaskedSession) and session.phase is MaskedPhase.INVITING


SESSION_DRIVERS: dict[str, type[SessionDriver]] = {
    cls.name: cls for cls in (ShamirDriver, MaskedDriver)
}
#: What ``[session] kind`` means when a config does not set it.
DEFAULT_SESSION_KIND = ShamirDriver.name


def driver_class(kind: str) -> type[SessionDriver]:
    """The driver registered as ``kind``; ValueError naming the known kinds otherwise."""
    try:
        return SESSION_DRIVERS[kind]
    except KeyError:
        raise ValueError(f"session kind must be one of {tuple(SESSION_DRIVERS)}, "
                         f"got {kind!r}") from None


def build_driver(config: NodeConfig) -> SessionDriver:
    """The driver for ``config.session_kind``, set up from ``config``."""
    return driver_class(config.session_kind).from_config(config)
