-- Location service (RFC 3261 §10): one row per binding of an address-of-record to a contact.
-- sipcore.location keeps every row in memory for lookups and writes through to this table, so
-- a restart (or another node, told by NOTIFY location_changed) sees exactly what was
-- acknowledged with a 200 OK.
CREATE TABLE location (
    aor          text             NOT NULL,  -- canonical sip:user@domain (location.aor_of)
    contact      text             NOT NULL,  -- Contact URI as registered, compared as text
    transport    text             NOT NULL,  -- where the REGISTER came from (RFC 3581):
    source_host  text             NOT NULL,  --   requests for this contact are sent there,
    source_port  integer          NOT NULL,  --   which is what reaches a phone behind NAT
    expires_at   timestamptz      NOT NULL,
    q            double precision NOT NULL DEFAULT 1.0,
    call_id      text             NOT NULL,  -- §10.3 step 7 ordering of updates
    cseq         bigint           NOT NULL,
    path         text             NOT NULL DEFAULT '',  -- RFC 3327 Path values, comma-joined
    user_agent   text             NOT NULL DEFAULT '',
    instance     text,                       -- RFC 5626 +sip.instance, as written
    reg_id       integer,                    -- RFC 5626 reg-id
    received_at  timestamptz      NOT NULL,
    PRIMARY KEY (aor, contact)
);

-- Start-up drops what expired while no node was running.
CREATE INDEX location_expires_at ON location (expires_at);
