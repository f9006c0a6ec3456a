"""The session kinds a node can run, behind one small interface (``[session] kind``).

The node (peer/network/node.py) owns the I/O (topics, signing, subscriptions) and its seat
(peer/network/session/seat.py) hosts the session: invitations, merging, events. What differs
between session kinds is how a session is made (``initiate``, ``join``), which INVITEs it
accepts, the model id it groups by and the topic it reads; a :class:`SessionKind` says exactly
that. Once made, a session of either kind is driven through the same public interface
(:class:`peer.network.session.group.GroupSession`: ``handle``, ``on_timeout``, ``abort``,
``inviting``...) in the wire's own message kinds, so neither node.py nor the seat holds a
per-kind branch. :data:`SESSION_KINDS` maps the config name to the class (the registry style
of peer/sharing/): a new session kind is one class and one line here.

* ``"shamir"`` (default): :class:`peer.network.session.shamir.Session`, Shamir shares and
  partial sums on direct topics (docs/sessions.md).
* ``"masked"``: :class:`peer.network.session.masked.MaskedSession`, one masked vector per
  member on the session topic (docs/design/masked-sessions.md, "In the node").

Security property of the split: peers of different kinds never form a session together. A
kind's :meth:`SessionKind.model_id` is the id the peer announces, samples invitees by and
requires in every INVITE (``check_invite``), and the masked kind's carries a ``-masked``
suffix, so a Shamir peer neither invites nor accepts a masked peer, and the other way round.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from peer.network.session.common import (
    Contribution,
    SessionContext,
    SessionParams,
    SessionTimeouts,
    Step,
    check_invite,
    group_min_sum,
    group_model_suffix,
)
from peer.network.session.group import GroupSession
from peer.network.session.masked import MaskedSession
from peer.network.session.masked_messages import MaskedTimeouts
from peer.network.session.shamir import Session
from protocol import messages as m
from protocol.topics import session_filter

if TYPE_CHECKING:  # settings imports the session modules' types, not this registry
    from peer.network.settings import NodeConfig, Trainer

#: Appended to the model id in masked mode (after the sharing strategy's own suffix).
MASKED_MODEL_SUFFIX = "-masked"


class SessionKind(ABC):
    """Makes sessions of one kind for a node; stateless between calls."""

    name: ClassVar[str]
    #: What :meth:`model_id` appends to the base model id.
    suffix: ClassVar[str] = ""

    @classmethod
    def from_timeouts(cls, timeouts: SessionTimeouts,
                      masked_timeouts: MaskedTimeouts | None = None) -> SessionKind:
        """This kind set up from the peer's session timeouts (``masked_timeouts``: the masked
        phases' own, when configured)."""
        return cls()

    def model_id(self, base: str) -> str:
        """The model id this peer announces and groups by: ``base`` plus the kind's suffix."""
        return base + self.suffix

    def check_invite(self, params: SessionParams, invite: m.Invite) -> str | None:
        """Why an INVITE must be declined on protocol grounds (None if acceptable)."""
        return check_invite(params, invite)

    def session_filter(self, network: str, session: GroupSession) -> str | None:
        """The subscription a session needs from its first message to its end (None: none)."""
        return None

    @abstractmethod
    def initiate(self, ctx: SessionContext, session_id: bytes, contribution: Contribution,
                 invitees: list[str], now: float) -> tuple[GroupSession, Step]:
        """A new session inviting ``invitees``, and its INVITEs."""

    @abstractmethod
    def join(self, ctx: SessionContext, header: m.Header, invite: m.Invite,
             contribution: Contribution, now: float) -> tuple[GroupSession, Step]:
        """A new session accepting ``invite`` (``check_invite`` passed), and its ACCEPT."""


class ShamirSessionKind(SessionKind):
    """The Shamir session (peer/network/session/shamir.py); its timeouts are the session
    parameters' (``SessionParams.timeouts``)."""

    name = "shamir"

    def initiate(self, ctx: SessionContext, session_id: bytes, contribution: Contribution,
                 invitees: list[str], now: float) -> tuple[GroupSession, Step]:
        return Session.initiate(ctx, session_id, contribution, invitees, now)

    def join(self, ctx: SessionContext, header: m.Header, invite: m.Invite,
             contribution: Contribution, now: float) -> tuple[GroupSession, Step]:
        return Session.join(ctx, header, invite, contribution, now)


def masked_timeouts_from(timeouts: SessionTimeouts) -> MaskedTimeouts:
    """The masked phases' timeouts from the Shamir ones: share_s bounds KEYS and MASKED,
    partial_s bounds CONFIRM and REVEAL, and an invitee waits for SURVIVORS as long as the
    initiator collects MASKED plus one CONFIRM phase (the initiator may mask last)."""
    return MaskedTimeouts(
        invite_s=timeouts.invite_s, start_s=timeouts.start_s, keys_s=timeouts.share_s,
        masked_s=timeouts.share_s, survivors_s=timeouts.share_s + timeouts.partial_s,
        confirm_s=timeouts.partial_s, reveal_s=timeouts.partial_s,
    )


class MaskedSessionKind(SessionKind):
    """Masked sessions (peer/network/session/masked.py), on a session topic each member
    subscribes to for the session's lifetime."""

    name = "masked"
    suffix = MASKED_MODEL_SUFFIX

    def __init__(self, timeouts: MaskedTimeouts) -> None:
        self.timeouts = timeouts

    @classmethod
    def from_timeouts(cls, timeouts: SessionTimeouts,
                      masked_timeouts: MaskedTimeouts | None = None) -> SessionKind:
        return cls(masked_timeouts or masked_timeouts_from(timeouts))

    def session_filter(self, network: str, session: GroupSession) -> str | None:
        return session_filter(network, session.session_id)

    def initiate(self, ctx: SessionContext, session_id: bytes, contribution: Contribution,
                 invitees: list[str], now: float) -> tuple[GroupSession, Step]:
        return MaskedSession.initiate(ctx, session_id, contribution, invitees, now,
                                      self.timeouts)

    def join(self, ctx: SessionContext, header: m.Header, invite: m.Invite,
             contribution: Contribution, now: float) -> tuple[GroupSession, Step]:
        return MaskedSession.join(ctx, header, invite, contribution, now, self.timeouts)


SESSION_KINDS: dict[str, type[SessionKind]] = {
    cls.name: cls for cls in (ShamirSessionKind, MaskedSessionKind)
}
#: What ``[session] kind`` means when a config does not set it.
DEFAULT_SESSION_KIND = ShamirSessionKind.name


def kind_class(name: str) -> type[SessionKind]:
    """The session kind registered as ``name``; ValueError naming the known kinds otherwise."""
    try:
        return SESSION_KINDS[name]
    except KeyError:
        raise ValueError(f"session kind must be one of {tuple(SESSION_KINDS)}, "
                         f"got {name!r}") from None


def build_kind(name: str, timeouts: SessionTimeouts,
               masked_timeouts: MaskedTimeouts | None = None) -> SessionKind:
    """The session kind ``name``, set up from the peer's timeouts."""
    return kind_class(name).from_timeouts(timeouts, masked_timeouts)


def session_params(network_id: str, config: NodeConfig, trainer: Trainer,
                   session_kind: SessionKind) -> SessionParams:
    """What every session of this peer agrees on with its members (model, group, timeouts).

    A group-noise trainer (``noise = "group"``) makes sessions that carry field elements and
    release only sums of at least h + c contributions; c joins h in the model id, so peers
    that disagree about either never group (docs/privacy.md, "Group noise")."""
    training = getattr(trainer, "config", None)
    group = getattr(training, "noise", "local") == "group"
    c = config.max_colluders
    model_id = session_kind.model_id(trainer.model_id)
    return SessionParams(
        network_id=network_id,
        model_id=model_id + group_model_suffix(c) if group else model_id,
        param_count=trainer.param_count,
        group_size=config.group_size, threshold=config.threshold,
        fixed_point=config.fixed_point, timeouts=config.timeouts,
        max_colluders=c,
        min_sum=group_min_sum(getattr(training, "honest_min", 0), c) if group else 0,
        field_contributions=group,
    )
