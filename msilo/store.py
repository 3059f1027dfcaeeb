"""The PostgreSQL side of the offline message store (RFC 3428 store and forward).

One row per stored MESSAGE (``msilo/migrations/0001_messages.sql``); the database is the truth
(ARCHITECTURE.md principle 5), nothing is cached, so several nodes and a restarted node see
the same queue.

Theory of operation
-------------------
A message goes through three states: *pending* (``delivered_at IS NULL``, no live lease),
*leased* (a node is delivering it: ``lease_until`` in the future) and *delivered*
(``delivered_at`` set once a 2xx was seen; purged by :meth:`MessageStore.sweep`).

* :meth:`MessageStore.store` inserts with the quota check in the same statement, and
  ``ON CONFLICT (dedup_key) DO NOTHING`` makes a MESSAGE offered twice one row.
* :meth:`MessageStore.claim_next` leases the *oldest* pending message of a recipient, and only
  if that one is not leased already: a recipient's messages go out one at a time and in the
  order received, whichever node delivers them.  The lease lasts longer than a client
  transaction can (Timer F), so it lapses only when its node crashed; the message is then
  claimed again (a delivery interrupted by a crash is retried).
* :meth:`MessageStore.mark_delivered` after a 2xx: ``delivered_at`` excludes the row from every
  later claim, so no message goes out again once a 2xx was seen.  The only window left is a
  crash between receiving the 2xx and this commit; the repeat then carries the same Call-ID,
  which lets the recipient recognise it.
* :meth:`MessageStore.mark_failed` clears the lease; a definitive refusal counts, and a
  message refused ``max_refusals`` times is deleted rather than blocking its recipient's queue.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import asyncpg

__all__ = ["MessageStore", "StoreResult", "StoredMessage"]


class StoreResult(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # the same MESSAGE was stored before
    FULL = "full"  # the recipient's quota is used up


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    recipient: str
    sender_uri: str
    sender_display: str | None
    content_type: str | None
    body: bytes
    received_at: float  # wall clock seconds
    expires_at: float
    delivery_call_id: str
    attempts: int
    refusals: int
    last_status: int | None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the control socket (the body as text when it decodes)."""
        try:
            text: str | None = self.body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        return {
            "id": self.id, "recipient": self.recipient, "sender": self.sender_uri,
            "sender_display": self.sender_display, "content_type": self.content_type,
            "size": len(self.body), "body": text, "received_at": self.received_at,
            "expires_at": self.expires_at, "attempts": self.attempts,
            "refusals": self.refusals, "last_status": self.last_status,
        }


_COLUMNS: Final = """
    id, recipient, sender_uri, sender_display, content_type, body,
    extract(epoch FROM received_at)::float8 AS received_at,
    extract(epoch FROM expires_at)::float8 AS expires_at,
    delivery_call_id, attempts, refusals, last_status
"""

_STORE_SQL: Final = """
WITH quota AS (
    SELECT count(*) AS n FROM msilo_messages
    WHERE recipient = $1 AND delivered_at IS NULL AND expires_at > now()
), dup AS (
    SELECT 1 FROM msilo_messages WHERE dedup_key = $8
), ins AS (
    INSERT INTO msilo_messages (recipient, sender_uri, sender_display, content_type, body,
                                received_at, expires_at, dedup_key, delivery_call_id)
    SELECT $1, $2, $3, $4, $5, to_timestamp($6::float8),
           to_timestamp($6::float8 + $7::float8), $8, $9
    FROM quota WHERE quota.n < $10 AND NOT EXISTS (SELECT 1 FROM dup)
    ON CONFLICT (dedup_key) DO NOTHING
    RETURNING id
)
SELECT (SELECT id FROM ins) AS id, (SELECT n FROM quota) AS n,
       EXISTS (SELECT 1 FROM dup) AS dup
"""

# The oldest pending message of the recipient, leased only if nobody holds it: the FOR UPDATE
# makes two claimers of one recipient queue up instead of both taking it.
_CLAIM_SQL: Final = f"""
WITH next AS (
    SELECT id, lease_until FROM msilo_messages
    WHERE recipient = $1 AND delivered_at IS NULL AND expires_at > now() AND id > $2
    ORDER BY id LIMIT 1
    FOR UPDATE
)
UPDATE msilo_messages m
SET lease_until = clock_timestamp() + make_interval(secs => $3::float8),
    attempts = m.attempts + 1, last_attempt_at = now()
FROM next
WHERE m.id = next.id AND (next.lease_until IS NULL OR next.lease_until < clock_timestamp())
RETURNING {_COLUMNS.replace("id,", "m.id,", 1)}
"""


class MessageStore:
    """Queries of the message store; ``expiry`` seconds a message is kept, ``quota`` pending
    messages per recipient."""

    def __init__(self, pool: asyncpg.Pool, *, expiry: float, quota: int,
                 clock: Any = time.time) -> None:
        self.pool = pool
        self.expiry = expiry
        self.quota = quota
        self.clock = clock

    async def store(self, recipient: str, sender_uri: str, sender_display: str | None,
                    content_type: str | None, body: bytes, *, dedup_key: str,
                    delivery_call_id: str, received_at: float | None = None) -> StoreResult:
        """Store one MESSAGE; raises asyncpg/OS errors when the database fails."""
        at = self.clock() if received_at is None else received_at
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                _STORE_SQL, recipient, sender_uri, sender_display, content_type, body, at,
                float(self.expiry), dedup_key, delivery_call_id, self.quota,
            )
        assert row is not None
        if row["id"] is not None:
            return StoreResult.STORED
        if row["dup"]:
            return StoreResult.DUPLICATE
        if row["n"] >= self.quota:
            return StoreResult.FULL
        return StoreResult.DUPLICATE  # lost an insert race with the same dedup_key

    async def claim_next(self, recipient: str, after_id: int,
                         lease_seconds: float) -> StoredMessage | None:
        """Lease the oldest pending message with id > ``after_id``; None when there is none
        or it is leased by someone else (then they are delivering this recipient)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_CLAIM_SQL, recipient, after_id, float(lease_seconds))
        return None if row is None else _message(row)

    async def recipients_waiting(self, recipients: Sequence[str]) -> set[str]:
        """Those of ``recipients`` with a message to deliver (one query per 1,000)."""
        waiting: set[str] = set()
        async with self.pool.acquire() as conn:
            for start in range(0, len(recipients), 1000):
                rows = await conn.fetch(
                    "SELECT DISTINCT recipient FROM msilo_messages WHERE recipient = ANY($1)"
                    " AND delivered_at IS NULL AND expires_at > now()",
                    list(recipients[start:start + 1000]))
                waiting.update(r[0] for r in rows)
        return waiting

    async def mark_delivered(self, message_id: int, status: int) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE msilo_messages SET delivered_at = now(), lease_until = NULL, "
                "last_status = $2 WHERE id = $1", message_id, status)

    async def mark_failed(self, message_id: int, status: int, *, refused: bool,
                          max_refusals: int) -> bool:
        """Release the lease after a failed attempt; True if the message was dropped because
        it was refused ``max_refusals`` times."""
        async with self.pool.acquire() as conn:
            if refused:
                gone = await conn.fetchval(
                    "DELETE FROM msilo_messages WHERE id = $1 AND refusals + 1 >= $2 "
                    "RETURNING id", message_id, max_refusals)
                if gone is not None:
                    return True
            await conn.execute(
                "UPDATE msilo_messages SET lease_until = NULL, last_status = $2, "
                "refusals = refusals + $3 WHERE id = $1", message_id, status, int(refused))
        return False

    async def pending_recipients(self, idle_seconds: float) -> list[str]:
        """Recipients with pending messages none of which is leased, and not attempted in the
        last ``idle_seconds`` (the periodic retry)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT recipient FROM msilo_messages
                WHERE delivered_at IS NULL AND expires_at > now()
                GROUP BY recipient
                HAVING bool_and(lease_until IS NULL OR lease_until < now())
                   AND coalesce(max(last_attempt_at), '-infinity'::timestamptz)
                       <= now() - make_interval(secs => $1::float8)
                """, float(idle_seconds))
        return [r["recipient"] for r in rows]

    async def sweep(self) -> tuple[int, int]:
        """Delete expired and delivered messages; returns (expired, delivered) counts."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                """
                WITH gone AS (
                    DELETE FROM msilo_messages
                    WHERE delivered_at IS NOT NULL OR expires_at <= now()
                    RETURNING delivered_at IS NULL AS expired
                )
                SELECT count(*) FILTER (WHERE expired) AS expired,
                       count(*) FILTER (WHERE NOT expired) AS delivered
                FROM gone
                """)
        assert row is not None
        return int(row["expired"]), int(row["delivered"])

    async def list(self, recipient: str, limit: int = 1000) -> list[StoredMessage]:
        """Pending messages of ``recipient``, oldest first."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM msilo_messages WHERE recipient = $1 "
                "AND delivered_at IS NULL AND expires_at > now() ORDER BY id LIMIT $2",
                recipient, limit)
        return [_message(r) for r in rows]

    async def count(self, recipient: str | None = None) -> int:
        """Pending messages of ``recipient``, or of everybody."""
        async with self.pool.acquire() as conn:
            if recipient is None:
                n = await conn.fetchval(
                    "SELECT count(*) FROM msilo_messages "
                    "WHERE delivered_at IS NULL AND expires_at > now()")
            else:
                n = await conn.fetchval(
                    "SELECT count(*) FROM msilo_messages WHERE recipient = $1 "
                    "AND delivered_at IS NULL AND expires_at > now()", recipient)
        return int(n)


def _message(row: Any) -> StoredMessage:
    return StoredMessage(
        id=row["id"], recipient=row["recipient"], sender_uri=row["sender_uri"],
        sender_display=row["sender_display"], content_type=row["content_type"],
        body=bytes(row["body"]), received_at=row["received_at"], expires_at=row["expires_at"],
        delivery_call_id=row["delivery_call_id"], attempts=row["attempts"],
        refusals=row["refusals"], last_status=row["last_status"],
    )
