"""Aggregation sessions: one small group rebuilds only the sum of its members' vectors.

``common`` holds what every kind shares (parameters, context, contributions, steps, formation
rules), ``group`` the base class both state machines build on (``GroupSession``),
``shamir`` and ``masked`` are the two state machines (``masked_agreement`` the masked one's
SURVIVORS / CONFIRM / REVEAL stage), ``masked_messages`` the masked kind's
bodies and encoding, ``early`` the bounded store for messages that arrive before START, and
``kinds`` the registry the node picks a kind from (``[session] kind``), and ``seat`` hosts the
one session a peer takes part in at a time.
"""
