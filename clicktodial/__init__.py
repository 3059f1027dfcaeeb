"""REFER-based click-to-dial user agent (RFC 3515)."""
