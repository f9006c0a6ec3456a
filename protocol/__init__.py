"""Murmur protocol package."""
