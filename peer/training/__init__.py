"""The training half of a peer: data, models, DP-SGD, privacy ledger, checkpoints, the trainer.

Imports torch, never MQTT: nothing here knows that a network exists. What a round produces
leaves through :mod:`peer.sharing` and the node in :mod:`peer.network`.
"""
