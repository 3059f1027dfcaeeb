-- Offline message store (RFC 3428 store and forward): MESSAGEs for local users who were not
-- registered, kept until a 2xx to their delivery was seen or they expire.  Rows are delivered
-- one at a time per recipient in id order, which is the order they were received.
CREATE TABLE msilo_messages (
    id              bigserial   PRIMARY KEY,
    recipient       text        NOT NULL,  -- canonical AoR sip:user@domain (location.aor_of)
    sender_uri      text        NOT NULL,  -- From URI of the original MESSAGE, as written
    sender_display  text,                  -- its display name, unquoted (NULL: none)
    content_type    text,                  -- Content-Type of the original, as written
    body            bytea       NOT NULL,  -- the body, byte for byte
    received_at     timestamptz NOT NULL DEFAULT now(),  -- goes out as the Date header
    expires_at      timestamptz NOT NULL,
    -- Call-ID, From tag, CSeq and recipient of the original: a MESSAGE offered twice (a
    -- retransmission that outlived its transaction, a second node) is stored once.
    dedup_key       text        NOT NULL UNIQUE,
    -- Call-ID of the deliveries, the same on every attempt, so a recipient that got an
    -- attempt whose 2xx was lost can recognise the repeat.
    delivery_call_id text       NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    refusals        integer     NOT NULL DEFAULT 0,  -- definitive non-2xx answers
    last_attempt_at timestamptz,
    last_status     integer,               -- status of the last attempt; 408/503 for none
    -- A node is delivering the message until then; a lease left by a crashed node lapses
    -- and the message is tried again.
    lease_until     timestamptz,
    -- A 2xx was seen: the message is never sent again (purged by the periodic sweep).
    delivered_at    timestamptz
);

CREATE INDEX msilo_messages_pending ON msilo_messages (recipient, id) WHERE delivered_at IS NULL;
CREATE INDEX msilo_messages_expires_at ON msilo_messages (expires_at);
