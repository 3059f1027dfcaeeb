-- billing 0004: the two writes of a call's life as one round trip each.
--
-- billing/credit.py computes every amount in Python (rating, maximum duration, cost); these
-- functions only take the locks, check, and write, in one statement so the proxy pays one
-- database round trip per step instead of a transaction of six. They are VOLATILE plpgsql:
-- in READ COMMITTED each statement inside takes a fresh snapshot, so the reservations read
-- after the account row is locked include every one committed before the lock was granted
-- (a single SQL statement would read them with the snapshot it started with, before waiting
-- for the lock, and two calls could both spend the last money). Lock order is the same as
-- everywhere else in billing: the account row first, then the call's rows.

-- Reserve ``p_amount`` for a new call if the account's available funds (balance + credit
-- limit - reservations) still cover it, and write the first half of its CDR.
-- ``p_expected_available`` (with ``p_rate_table``): the funds, rate table and currency the
-- amount was computed from, when they came from the caller's memory rather than a read just
-- before; anything different under the lock answers 'stale' and reserves nothing.
-- o_outcome: ok | existing (this Call-ID holds a reservation already: o_existing_*) |
-- no_account | locked | too_many_calls | funds (o_available is what is left: recompute and
-- try again) | stale | duplicate_call_id (the Call-ID was charged before).
CREATE FUNCTION billing_reserve(
    p_call_id text, p_account_id bigint, p_amount numeric, p_max_duration integer,
    p_default_call_limit integer, p_caller_username text, p_caller_domain text,
    p_callee text, p_destination text, p_prefix text, p_rate_id bigint, p_rate jsonb,
    p_currency char(3), p_now timestamptz, p_node text, p_expected_available numeric,
    p_rate_table text,
    OUT o_outcome text, OUT o_balance numeric, OUT o_reserved numeric,
    OUT o_available numeric, OUT o_existing_account bigint, OUT o_existing_amount numeric,
    OUT o_existing_max_duration integer)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    acct accounts%ROWTYPE;
    held_calls integer;
    call_limit integer;
    existing reservations%ROWTYPE;
    cdr_id bigint;
BEGIN
    SELECT * INTO acct FROM accounts WHERE id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        o_outcome := 'no_account';
        RETURN;
    END IF;
    IF p_expected_available IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM account_subscribers WHERE username = p_caller_username
        AND domain = p_caller_domain AND account_id = p_account_id
    ) THEN
        o_outcome := 'stale';  -- the subscriber was moved to another account
        RETURN;
    END IF;
    o_balance := acct.balance;
    IF acct.status = 'locked' THEN
        o_outcome := 'locked';
        RETURN;
    END IF;
    SELECT count(*), COALESCE(sum(amount), 0) INTO held_calls, o_reserved
    FROM reservations WHERE account_id = p_account_id;
    o_available := acct.balance + acct.credit_limit - o_reserved;
    IF p_expected_available IS NOT NULL AND (o_available <> p_expected_available
            OR acct.rate_table <> p_rate_table OR acct.currency <> p_currency) THEN
        o_outcome := 'stale';
        RETURN;
    END IF;
    SELECT * INTO existing FROM reservations WHERE call_id = p_call_id;
    IF FOUND THEN
        -- The same INVITE authorised again (a retry after a lost reply): the same answer.
        o_outcome := 'existing';
        o_existing_account := existing.account_id;
        o_existing_amount := existing.amount;
        o_existing_max_duration := existing.max_duration;
        RETURN;
    END IF;
    call_limit := CASE WHEN acct.max_concurrent_calls > 0 THEN acct.max_concurrent_calls
                       ELSE p_default_call_limit END;
    IF call_limit > 0 AND held_calls >= call_limit THEN
        o_outcome := 'too_many_calls';
        RETURN;
    END IF;
    IF o_available < p_amount THEN
        o_outcome := 'funds';
        RETURN;
    END IF;
    INSERT INTO cdrs (call_id, account_id, caller_username, caller_domain, callee,
        destination, prefix, rate_id, rate, currency, reserved_amount, max_duration,
        start_at, status, node)
    VALUES (p_call_id, p_account_id, p_caller_username, p_caller_domain, p_callee,
        p_destination, p_prefix, p_rate_id, p_rate, p_currency, p_amount, p_max_duration,
        p_now, 'in_progress', p_node)
    ON CONFLICT (call_id) DO UPDATE SET
        account_id = EXCLUDED.account_id, callee = EXCLUDED.callee,
        destination = EXCLUDED.destination, prefix = EXCLUDED.prefix,
        rate_id = EXCLUDED.rate_id, rate = EXCLUDED.rate,
        currency = EXCLUDED.currency, reserved_amount = EXCLUDED.reserved_amount,
        max_duration = EXCLUDED.max_duration, start_at = EXCLUDED.start_at,
        answer_at = NULL, end_at = NULL, billed_duration = NULL,
        charged_duration = NULL, cost = NULL, status = 'in_progress',
        disconnect_reason = NULL, node = EXCLUDED.node
    -- A Call-ID may be reused after a failed attempt (RFC 3261 §8.1.3.5), never after it
    -- was charged.
    WHERE cdrs.journal_id IS NULL AND cdrs.answer_at IS NULL AND cdrs.status <> 'in_progress'
    RETURNING id INTO cdr_id;
    IF cdr_id IS NULL THEN
        o_outcome := 'duplicate_call_id';
        RETURN;
    END IF;
    INSERT INTO reservations (call_id, account_id, amount, max_duration, created_at, node)
    VALUES (p_call_id, p_account_id, p_amount, p_max_duration, p_now, p_node);
    o_reserved := o_reserved + p_amount;
    o_outcome := 'ok';
END
$$;

-- Settle a call answered at ``p_answered_at`` (NULL: never answered): charge ``p_cost``
-- (journal row and balance together), delete the reservation, complete the CDR. An answer
-- not recorded yet (the proxy writes answers in batches) is taken from ``p_answered_at``.
-- o_outcome: settled | gone (no reservation: settled before, by this node or a recovery
-- sweep) | changed (another answer time is recorded: read again and recompute).
CREATE FUNCTION billing_settle(
    p_call_id text, p_answered_at timestamptz, p_status text, p_end_at timestamptz,
    p_duration integer, p_charged integer, p_cost numeric, p_reason text,
    p_recovered boolean, p_journal_reason text,
    OUT o_outcome text, OUT o_account_id bigint, OUT o_journal_id bigint,
    OUT o_balance_after numeric, OUT o_below_threshold boolean, OUT o_available numeric)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    acct accounts%ROWTYPE;
    res reservations%ROWTYPE;
    held numeric;
BEGIN
    SELECT * INTO acct FROM accounts
    WHERE id = (SELECT account_id FROM reservations WHERE call_id = p_call_id)
    FOR UPDATE;
    IF NOT FOUND THEN
        o_outcome := 'gone';
        RETURN;
    END IF;
    SELECT * INTO res FROM reservations WHERE call_id = p_call_id FOR UPDATE;
    IF NOT FOUND THEN
        o_outcome := 'gone';
        RETURN;
    END IF;
    IF res.answered_at IS DISTINCT FROM p_answered_at
       AND NOT (res.answered_at IS NULL AND p_answered_at IS NOT NULL) THEN
        o_outcome := 'changed';
        RETURN;
    END IF;
    o_account_id := acct.id;
    o_balance_after := acct.balance;
    o_below_threshold := false;
    IF p_cost > 0 THEN
        o_balance_after := acct.balance - p_cost;
        INSERT INTO journal (account_id, amount, balance_after, kind, reason, reference)
        VALUES (acct.id, -p_cost, o_balance_after, 'charge', p_journal_reason, p_call_id)
        RETURNING id INTO o_journal_id;  -- a second charge of one Call-ID fails (unique)
        UPDATE accounts SET balance = o_balance_after, updated_at = now() WHERE id = acct.id;
        o_below_threshold := acct.low_balance_threshold IS NOT NULL
                             AND o_balance_after < acct.low_balance_threshold;
    END IF;
    DELETE FROM reservations WHERE id = res.id;
    -- What the account's next call may draw on (the caller keeps it for that call).
    SELECT COALESCE(sum(amount), 0) INTO held FROM reservations WHERE account_id = acct.id;
    o_available := o_balance_after + acct.credit_limit - held;
    UPDATE cdrs SET status = p_status, answer_at = COALESCE(answer_at, p_answered_at),
        end_at = p_end_at, billed_duration = p_duration,
        charged_duration = p_charged, cost = p_cost, journal_id = o_journal_id,
        disconnect_reason = p_reason, recovered = p_recovered
    WHERE call_id = p_call_id;
    o_outcome := 'settled';
END
$$;
