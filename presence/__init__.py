"""Presence status and SUBSCRIBE/NOTIFY (RFC 3856)."""
