"""Transport-level address of a SIP peer (RFC 3261 §18).

A :class:`Peer` names where a message came from or goes to: the transport protocol as it
appears in a Via sent-protocol (RFC 3261 §18.2.1, §20.42; "WS" from RFC 7118) plus the
host and port.  ``reliable`` tells the transaction layer whether retransmission timers apply
(RFC 3261 §17.1.1.2: Timer A is only started for unreliable transports).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["RELIABLE_TRANSPORTS", "Peer"]

#: Transports that deliver in order without loss, so the SIP layer does not retransmit.
RELIABLE_TRANSPORTS: frozenset[str] = frozenset({"TCP", "TLS", "WS", "WSS", "SCTP"})


@dataclass(init=False, eq=False, slots=True)
class Peer:
    """One end of a SIP hop: transport ("UDP", "TCP", "TLS", "WS"), host and port."""

    transport: Final[str]
    host: Final[str]
    port: Final[int]

    def __init__(self, transport: str, host: str, port: int) -> None:
        self.transport = transport
        self.host = host
        self.port = port

    # By hand, not by the dataclass decorator: a Peer is a dict key on every message, and
    # the decorator's methods would be Python even where this module is compiled.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Peer):
            return NotImplemented
        return (self.port == other.port and self.host == other.host
                and self.transport == other.transport)

    def __hash__(self) -> int:
        return hash((self.transport, self.host, self.port))

    @property
    def reliable(self) -> bool:
        """True for stream/reliable transports (no SIP-level retransmissions)."""
        return self.transport.upper() in RELIABLE_TRANSPORTS

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{self.transport}:{host}:{self.port}"
