"""Response times of a SIP server measured on the wire (a helper of sip_load.py).

SIPp's own response times (``-trace_rtt``) come from a clock that advances in steps of a few
milliseconds on this machine, so a sub-millisecond median reads as 0 and a p99 as 4 or 8.
Instead the benchmark captures the server's UDP port on the loopback interface with a packet
socket (``AF_PACKET``, needs root or CAP_NET_RAW) and lets the kernel stamp each packet
(``SO_TIMESTAMPNS``).  A classic BPF filter keeps only IPv4 UDP to or from the port, so the
capture thread sees nothing else; the packets are only stored while capturing and are parsed
afterwards, which keeps the capture's own CPU small.

A transaction's response time is from the first copy of a request arriving at the server
(retransmissions ignored) to the first final response (>= 200) the server sends back to the
request's source, matched by Call-ID and CSeq (RFC 3261 §17.2.3 would use the branch; the
scenarios never reuse a Call-ID/CSeq pair, and the CSeq is what ties the response to its
request without a full parse).  Requests the server sends itself (to the UAS) and responses it
receives are not transactions *of the server*; ACK has no response.  For a proxied request the
time includes the UAS's answer, which is what the caller waits for.

For proxied requests two more kinds separate the proxy's own share from the far end's:
``"INVITE relay"`` runs from the request's arrival to the first copy the server sends on, and
``"INVITE 200 relay"`` from a final response's first arrival from downstream to the first copy
the server sends upstream.  Their sum is the time the transaction spent in the server.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import socket
import struct
import threading
from collections.abc import Iterator
from types import TracebackType

ETH_P_IP = 0x0800
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
PACKET_IGNORE_OUTGOING = 23
SOL_PACKET = 263
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35  # Linux; the socket module does not export it

_CALL_ID = re.compile(rb"\r\n(?:Call-ID|i)[ \t]*:[ \t]*(\S+)", re.IGNORECASE)
_CSEQ = re.compile(rb"\r\nCSeq[ \t]*:[ \t]*(\d+)[ \t]+([A-Za-z]+)", re.IGNORECASE)


def _udp_port_filter(port: int) -> list[tuple[int, int, int, int]]:
    """BPF for ``ip and udp and port PORT`` on Ethernet framing (what ``lo`` delivers);
    the same program ``tcpdump -dd`` prints, minus its IPv6 branch."""
    return [
        (0x28, 0, 0, 12),        # 0: ldh [12]            ethertype
        (0x15, 0, 10, 0x0800),   # 1: jeq IPv4, else ret 0
        (0x30, 0, 0, 23),        # 2: ldb [23]            IP protocol
        (0x15, 0, 8, 17),        # 3: jeq UDP, else ret 0
        (0x28, 0, 0, 20),        # 4: ldh [20]            fragment offset
        (0x45, 6, 0, 0x1FFF),    # 5: jset -> ret 0 (not a first fragment)
        (0xB1, 0, 0, 14),        # 6: ldxb 4*([14]&0xf)   IP header length
        (0x48, 0, 0, 14),        # 7: ldh [x+14]          source port
        (0x15, 2, 0, port),      # 8: jeq port -> accept
        (0x48, 0, 0, 16),        # 9: ldh [x+16]          destination port
        (0x15, 0, 1, port),      # 10: jeq port -> accept, else ret 0
        (0x06, 0, 0, 0x40000),   # 11: ret whole packet
        (0x06, 0, 0, 0),         # 12: ret 0
    ]


class Capture:
    """Context manager: capture the UDP traffic of ``port`` on ``lo`` while inside it."""

    def __init__(self, port: int, interface: str = "lo") -> None:
        self.port = port
        self.interface = interface
        self.packets: list[tuple[float, bytes]] = []
        self.dropped_outgoing = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._prog: ctypes.Array[ctypes.c_char] | None = None

    @staticmethod
    def available() -> bool:
        try:
            socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP)).close()
        except (OSError, AttributeError):
            return False
        return True

    def __enter__(self) -> Capture:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
        insns = _udp_port_filter(self.port)
        self._prog = ctypes.create_string_buffer(
            b"".join(struct.pack("HBBI", *i) for i in insns))
        fprog = struct.pack("HL", len(insns), ctypes.addressof(self._prog))
        s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        # On lo every packet passes the tap twice (sent and received); keep one copy.
        with contextlib.suppress(OSError):
            s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.bind((self.interface, 0))
        s.settimeout(0.2)
        self._sock = s
        self._thread = threading.Thread(target=self._run, name="sipcapture", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        s = self._sock
        assert s is not None
        append = self.packets.append
        while not self._stop.is_set():
            try:
                data, anc, _flags, addr = s.recvmsg(65600, 64)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING:
                self.dropped_outgoing += 1
                continue
            ts = 0.0
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", cdata[:16])
                    ts = sec + nsec / 1e9
            append((ts, data))

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._sock is not None:
            self._sock.close()

    def _datagrams(self) -> Iterator[tuple[float, tuple[int, int], tuple[int, int], bytes]]:
        """(time, (src ip, src port), (dst ip, dst port), payload) of each captured datagram."""
        for ts, frame in self.packets:
            ihl = (frame[14] & 0x0F) * 4
            src_ip, dst_ip = struct.unpack_from("!II", frame, 14 + 12)
            sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
            yield ts, (src_ip, sport), (dst_ip, dport), frame[14 + ihl + 8:]

    def response_times(self) -> dict[str, list[float]]:
        """Seconds from request to final response for requests to the server, keyed by
        method and final status (``"REGISTER 401"``, ``"REGISTER 200"``, ``"INVITE 200"``),
        and the relay times of proxied requests and their final responses (``"INVITE
        relay"``, ``"INVITE 200 relay"``, see the module docstring)."""
        started: dict[tuple[bytes, bytes, bytes, tuple[int, int]], float] = {}
        done: set[tuple[bytes, bytes, bytes, tuple[int, int]]] = set()
        arrived: dict[tuple[bytes, bytes, bytes], float] = {}  # request in, by Call-ID/CSeq
        relayed: set[tuple[bytes, bytes, bytes]] = set()
        answers: dict[tuple[bytes, bytes, bytes, bytes], float] = {}  # final response in
        answered: set[tuple[bytes, bytes, bytes, bytes]] = set()
        out: dict[str, list[float]] = {}
        for ts, src, dst, payload in self._datagrams():
            cid = _CALL_ID.search(payload)
            cseq = _CSEQ.search(payload)
            if cid is None or cseq is None:
                continue
            tx = (cid.group(1), cseq.group(1), cseq.group(2).upper())
            if payload.startswith(b"SIP/2.0 "):
                if payload[8:9] == b"1":
                    continue
                status = payload[8:11]
                if dst[1] == self.port:  # from downstream: the relay clock starts
                    answers.setdefault((*tx, status), ts)
                    continue
                if src[1] != self.port:
                    continue
                t_in = answers.get((*tx, status))
                if t_in is not None and (*tx, status) not in answered:
                    answered.add((*tx, status))
                    out.setdefault(f"{tx[2].decode()} {status.decode()} relay", []).append(
                        ts - t_in)
                key = (*tx, dst)
                t0 = started.get(key)
                if t0 is not None and key not in done:
                    done.add(key)
                    kind = f"{key[2].decode()} {status.decode()}"
                    out.setdefault(kind, []).append(ts - t0)
            elif dst[1] == self.port:
                started.setdefault((*tx, src), ts)
                arrived.setdefault(tx, ts)
            elif src[1] == self.port and tx[2] != b"ACK":
                t0 = arrived.get(tx)
                if t0 is not None and tx not in relayed:
                    relayed.add(tx)
                    out.setdefault(f"{tx[2].decode()} relay", []).append(ts - t0)
        return out
