"""Murmur sim package."""
