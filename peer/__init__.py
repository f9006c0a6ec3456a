"""Murmur peer package."""
