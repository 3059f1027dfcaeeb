"""PIDF documents for the presence event package (RFC 3863, RFC 3856 §6.6), sans-IO.

The server derives presence from registrations only, so a document has one tuple whose
``<basic>`` is ``open`` while the presentity has a live binding and ``closed`` otherwise
(RFC 3863 §4.1.4).  Contacts are not published: they are the phones' addresses, which a
watcher has no business learning.  The tuple id is derived from the entity, so successive
documents describe the same tuple (RFC 3863 §4.1.2: "the same tuple ... MUST have the same
id").
"""

from __future__ import annotations

import hashlib
import time
from typing import Final, Literal
from xml.sax.saxutils import escape, quoteattr

__all__ = ["CONTENT_TYPE", "Basic", "pidf_document", "tuple_id"]

CONTENT_TYPE: Final = "application/pidf+xml"
NAMESPACE: Final = "urn:ietf:params:xml:ns:pidf"

Basic = Literal["open", "closed"]


def tuple_id(entity: str) -> str:
    """An XML ``ID`` (must start with a letter) stable for ``entity``."""
    return "t" + hashlib.blake2s(entity.encode(), digest_size=6).hexdigest()


def _timestamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


def pidf_document(entity: str, basic: Basic, *, now: float | None = None,
                  note: str | None = None) -> bytes:
    """The PIDF XML for ``entity`` (a ``sip:`` URI) with one tuple of status ``basic``."""
    at = time.time() if now is None else now
    note_xml = f"<note>{escape(note)}</note>" if note else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<presence xmlns={quoteattr(NAMESPACE)} entity={quoteattr(entity)}>\n"
        f"  <tuple id={quoteattr(tuple_id(entity))}>\n"
        f"    <status><basic>{basic}</basic></status>\n"
        f"    <timestamp>{_timestamp(at)}</timestamp>\n"
        f"  </tuple>\n"
        f"  {note_xml}\n"
        "</presence>\n"
    ).replace("  \n", "").encode("utf-8")
