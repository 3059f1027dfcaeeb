-- Presence (RFC 3856): subscribers who hide their status, and the subscriptions this server
-- serves as notifier (RFC 6665), so a restart keeps them.

-- A hidden subscriber appears offline (PIDF basic "closed") to every watcher and status query.
CREATE TABLE presence_hidden (
    aor        text        PRIMARY KEY,  -- canonical sip:user@domain
    hidden_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per subscription dialog (RFC 3261 §12: Call-ID, the watcher's tag, our tag).
CREATE TABLE presence_subscriptions (
    call_id        text        NOT NULL,
    remote_tag     text        NOT NULL,  -- the watcher's From tag
    local_tag      text        NOT NULL,  -- our To tag
    presentity     text        NOT NULL,  -- the AoR watched
    presentity_uri text        NOT NULL,  -- To URI as the watcher wrote it (NOTIFY From)
    watcher        text        NOT NULL,  -- the authenticated watcher's AoR
    watcher_from   text        NOT NULL,  -- the SUBSCRIBE's From value (NOTIFY To)
    remote_target  text        NOT NULL,  -- the watcher's Contact URI (NOTIFY Request-URI)
    route_set      text        NOT NULL DEFAULT '',  -- Record-Route of the SUBSCRIBE, in order
    transport      text        NOT NULL,  -- where the SUBSCRIBE came from: NOTIFYs go there
    peer_host      text        NOT NULL,
    peer_port      integer     NOT NULL,
    event_id       text,                  -- the Event header's id parameter
    remote_cseq    bigint      NOT NULL,
    local_cseq     bigint      NOT NULL DEFAULT 0,  -- CSeq of our last NOTIFY
    expires_at     timestamptz NOT NULL,
    PRIMARY KEY (call_id, remote_tag, local_tag)
);

CREATE INDEX presence_subscriptions_presentity ON presence_subscriptions (presentity);
