-- Subscribers (RFC 3261 §22 digest users). Only derived secrets are stored: HA1 for MD5 and
-- for SHA-256 (RFC 7616), and an MD5 of the password for the legacy balance.php lookup.
CREATE TABLE subscribers (
    id           bigserial   PRIMARY KEY,
    username     text        NOT NULL,
    domain       text        NOT NULL,
    ha1_md5      text        NOT NULL,
    ha1_sha256   text        NOT NULL,
    password_md5 text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (username, domain)
);
