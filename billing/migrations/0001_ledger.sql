-- billing 0001: the prepaid ledger, rate tables, credit reservations and two-part CDRs.
--
-- Money is NUMERIC (exact); Python reads it as decimal.Decimal. Every change of
-- accounts.balance is a journal row written in the same transaction (billing/ledger.py), so
-- balance = sum(journal.amount) per account at every commit.
--
-- Subscribers are referred to by (username, domain) without a foreign key into sipcore's
-- subscribers table: billing can be loaded, tested and operated without sipcore, and an
-- account can be set up before its phone is provisioned.

CREATE TABLE accounts (
    id                    bigserial   PRIMARY KEY,
    name                  text        NOT NULL UNIQUE CHECK (name <> ''),
    currency              char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    balance               numeric     NOT NULL DEFAULT 0,
    -- 0 for prepaid; a postpaid account may go negative down to -credit_limit.
    credit_limit          numeric     NOT NULL DEFAULT 0 CHECK (credit_limit >= 0),
    status                text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'locked')),
    -- Why it is locked: 'low_balance' is lifted by a top-up above the threshold, others
    -- (e.g. 'manual') only by an explicit unlock.
    lock_reason           text,
    low_balance_threshold numeric,
    -- Amount drawn from the payment provider when a charge takes the balance below the
    -- threshold; NULL: no auto-recharge (the account is locked instead).
    auto_recharge_amount  numeric     CHECK (auto_recharge_amount > 0),
    rate_table            text        NOT NULL DEFAULT 'default',
    -- 0: the [billing] max_concurrent_calls_per_account setting applies.
    max_concurrent_calls  integer     NOT NULL DEFAULT 0 CHECK (max_concurrent_calls >= 0),
    -- Where calls to this account's subscribers go while it is locked (voicemail).
    diversion_uri         text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'locked') = (lock_reason IS NOT NULL))
);

-- Which account pays for a subscriber's calls: one account per subscriber, several
-- subscribers may share one account.
CREATE TABLE account_subscribers (
    username   text        NOT NULL,
    domain     text        NOT NULL,
    account_id bigint      NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (username, domain)
);
CREATE INDEX account_subscribers_account ON account_subscribers (account_id);

CREATE TABLE journal (
    id            bigserial   PRIMARY KEY,
    account_id    bigint      NOT NULL REFERENCES accounts (id),
    amount        numeric     NOT NULL CHECK (amount <> 0),
    balance_after numeric     NOT NULL,
    kind          text        NOT NULL
                  CHECK (kind IN ('topup', 'charge', 'refund', 'adjustment', 'recharge')),
    reason        text        NOT NULL DEFAULT '',
    -- Call-ID for charges, payment reference for top-ups: one posting per (kind, reference),
    -- which is what makes settling a call idempotent. NULL references never collide.
    reference     text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, reference)
);
CREATE INDEX journal_account_time ON journal (account_id, created_at, id);

CREATE TABLE rates (
    id               bigserial   PRIMARY KEY,
    rate_table       text        NOT NULL DEFAULT 'default',
    -- Digits of the normalised number (no '+', no international prefix).
    prefix           text        NOT NULL CHECK (prefix ~ '^[0-9]+$'),
    description      text        NOT NULL DEFAULT '',
    currency         char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    price_per_minute numeric     NOT NULL CHECK (price_per_minute >= 0),
    connect_fee      numeric     NOT NULL DEFAULT 0 CHECK (connect_fee >= 0),
    first_increment  integer     NOT NULL DEFAULT 60 CHECK (first_increment > 0),
    next_increment   integer     NOT NULL DEFAULT 60 CHECK (next_increment > 0),
    min_duration     integer     NOT NULL DEFAULT 0 CHECK (min_duration >= 0),
    rounding         text        NOT NULL DEFAULT 'up'
                     CHECK (rounding IN ('up', 'half_up', 'half_even', 'down')),
    -- Decimals of a call's cost; NULL: the currency's minor units.
    decimals         smallint    CHECK (decimals BETWEEN 0 AND 8),
    -- Weekday band: bit 0 = Monday ... bit 6 = Sunday (127: every day).
    weekdays         smallint    NOT NULL DEFAULT 127 CHECK (weekdays BETWEEN 1 AND 127),
    -- Time-of-day band in minutes after local midnight, [band_start, band_end); a band with
    -- band_start > band_end wraps past midnight (22:00-06:00).
    band_start       smallint    NOT NULL DEFAULT 0 CHECK (band_start BETWEEN 0 AND 1439),
    band_end         smallint    NOT NULL DEFAULT 1440 CHECK (band_end BETWEEN 1 AND 1440),
    valid_from       timestamptz,
    valid_to         timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (band_start <> band_end),
    CHECK (valid_to IS NULL OR valid_from IS NULL OR valid_from < valid_to)
);
CREATE UNIQUE INDEX rates_unique_band ON rates (
    rate_table, prefix, weekdays, band_start, band_end, COALESCE(valid_from, '-infinity')
);

-- Nodes (server processes) that hold reservations; a node that stops heartbeating is gone
-- and its calls are settled by the recovery sweep of another (or its next) incarnation.
CREATE TABLE billing_nodes (
    node_id    text        PRIMARY KEY,
    name       text        NOT NULL,
    started_at timestamptz NOT NULL,
    seen_at    timestamptz NOT NULL
);

-- AstBill's 'astcreditres': the maximum cost of each call in progress, held against the
-- account's available funds until the call is settled or fails.
CREATE TABLE reservations (
    id           bigserial   PRIMARY KEY,
    call_id      text        NOT NULL UNIQUE,
    account_id   bigint      NOT NULL REFERENCES accounts (id),
    amount       numeric     NOT NULL CHECK (amount >= 0),
    max_duration integer     NOT NULL CHECK (max_duration >= 0),
    created_at   timestamptz NOT NULL,
    answered_at  timestamptz,
    node         text        NOT NULL,
    -- Last moment the node saw the call alive: recovery bills up to here.
    heartbeat_at timestamptz
);
CREATE INDEX reservations_account ON reservations (account_id);
CREATE INDEX reservations_node ON reservations (node);

-- AstBill's two-part 'astcdr': written at authorisation, completed at the end of the call.
CREATE TABLE cdrs (
    id                bigserial   PRIMARY KEY,
    call_id           text        NOT NULL UNIQUE,
    account_id        bigint      REFERENCES accounts (id),
    caller_username   text        NOT NULL,
    caller_domain     text        NOT NULL,
    callee            text        NOT NULL,           -- as dialled
    destination       text,                           -- normalised number
    prefix            text,
    rate_id           bigint,
    rate              jsonb,                          -- snapshot of the rate used
    currency          char(3),
    reserved_amount   numeric,
    max_duration      integer,
    start_at          timestamptz NOT NULL,
    answer_at         timestamptz,
    end_at            timestamptz,
    billed_duration   integer,                        -- seconds from answer to end (capped)
    charged_duration  integer,                        -- after increments and minimum
    cost              numeric,
    journal_id        bigint      REFERENCES journal (id),
    status            text        NOT NULL DEFAULT 'in_progress'
                      CHECK (status IN ('in_progress', 'answered', 'busy', 'no_answer', 'rejected',
                                        'offline', 'cancelled', 'failed', 'unbillable')),
    disconnect_reason text,
    recovered         boolean     NOT NULL DEFAULT false,
    seen              boolean     NOT NULL DEFAULT false,  -- missed call acknowledged by callee
    node              text
);
CREATE INDEX cdrs_account_time ON cdrs (account_id, start_at);
CREATE INDEX cdrs_callee_missed ON cdrs (callee, start_at)
    WHERE status IN ('busy', 'no_answer', 'offline', 'cancelled') AND NOT seen;

-- Calls refused for lack of a rate, kept so an operator can add the missing range and
-- re-rate them (CreditControl.rerate_unbillable).
CREATE TABLE unbillable_attempts (
    id              bigserial   PRIMARY KEY,
    call_id         text        NOT NULL,
    account_id      bigint      REFERENCES accounts (id),
    caller_username text        NOT NULL,
    caller_domain   text        NOT NULL,
    callee          text        NOT NULL,
    destination     text,
    rate_table      text,
    reason          text        NOT NULL,
    attempted_at    timestamptz NOT NULL,
    rerated_at      timestamptz,
    rate_id         bigint,
    prefix          text
);
CREATE INDEX unbillable_pending ON unbillable_attempts (destination) WHERE rerated_at IS NULL;

-- Stored value a customer registered in advance (vouchers, prepaid cards) that the
-- VoucherProvider draws on for auto-recharges. A card processor keeps this state elsewhere.
CREATE TABLE stored_value (
    account_id bigint      PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    currency   char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    balance    numeric     NOT NULL DEFAULT 0 CHECK (balance >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE stored_value_journal (
    id         bigserial   PRIMARY KEY,
    account_id bigint      NOT NULL REFERENCES stored_value (account_id) ON DELETE CASCADE,
    amount     numeric     NOT NULL CHECK (amount <> 0),
    reference  text        UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
