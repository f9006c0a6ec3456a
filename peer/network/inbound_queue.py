"""The transport's queue of MQTT messages not yet handled, bounded in bytes as well as count.

Security property: what a peer holds for messages it has not looked at yet stays below a byte
budget plus one packet, whatever a broker or a flooding client delivers (docs/protocol.md,
section 11).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiomqtt

from protocol.limits import MAX_PAYLOAD_BYTES

__all__ = ["DEFAULT_MAX_QUEUED_INCOMING", "DEFAULT_MAX_QUEUED_INCOMING_BYTES",
           "INBOUND_OVER_BUDGET", "IncomingQueue"]

# Messages waiting for the handler. Bounded in count and in bytes so that a flood cannot
# exhaust memory: a broker may deliver packets far larger than any Murmur message (Mosquitto's
# default packet limit is 256 MB), so the count alone bounds nothing.
DEFAULT_MAX_QUEUED_INCOMING = 256
#: Bytes of payload waiting for the handler, at most (four of the largest legal messages).
DEFAULT_MAX_QUEUED_INCOMING_BYTES = 4 * MAX_PAYLOAD_BYTES
#: The reason a message refused by the inbound queue is counted under.
INBOUND_OVER_BUDGET = "inbound_over_budget"


class IncomingQueue(asyncio.Queue["aiomqtt.Message"]):
    """aiomqtt's incoming queue, bounded in payload bytes as well as in messages.

    A message larger than ``max_message_bytes`` (no receiver would accept it) or one that
    would take the queued payload past ``max_bytes`` is refused (``asyncio.QueueFull``, which
    aiomqtt turns into a discard) and reported to ``on_refused``; the memory this peer holds
    for messages it has not looked at yet stays below ``max_bytes`` plus one packet.
    """

    def __init__(self, maxsize: int = 0, *, max_bytes: int, max_message_bytes: int,
                 on_refused: Callable[[int], None]) -> None:
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.max_message_bytes = max_message_bytes
        self.queued_bytes = 0
        self._on_refused = on_refused

    @staticmethod
    def _size(message: aiomqtt.Message) -> int:
        payload = message.payload
        return len(payload) if isinstance(payload, bytes | bytearray) else 0

    def put_nowait(self, item: aiomqtt.Message) -> None:
        size = self._size(item)
        if size > self.max_message_bytes or self.queued_bytes + size > self.max_bytes:
            self._on_refused(size)
            raise asyncio.QueueFull
        super().put_nowait(item)
        self.queued_bytes += size

    def get_nowait(self) -> aiomqtt.Message:
        item = super().get_nowait()
        self.queued_bytes -= self._size(item)
        return item
