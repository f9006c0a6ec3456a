"""The network half of a peer: MQTT transport, membership, aggregation sessions, the node.

Imports MQTT and numpy, never torch: it moves sparse numpy vectors and knows nothing of models.
The trainer reaches it only through the ``Trainer`` protocol in :mod:`peer.network.node`.
"""
