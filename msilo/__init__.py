"""Offline message store (RFC 3428 MESSAGE store-and-forward)."""
