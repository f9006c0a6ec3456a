"""Murmur crypto package."""
