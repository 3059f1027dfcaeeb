-- billing 0005: every change to what a subscriber is shown as balance (the account's balance
-- or currency, its reservations, which account a subscriber belongs to) sends
-- NOTIFY billing_account_changed with the account id, in the changing transaction (delivered
-- at its commit); a change of which account a subscriber belongs to adds the subscriber
-- (account id, username and domain separated by tabs), so a cached "no account" is dropped too. Nodes keep the shown balances in memory (billing.balances.BalanceCache),
-- so a REGISTER's Balance-amount costs no query, and drop an account's entries on this.
CREATE FUNCTION billing_notify_account_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'accounts' THEN
        PERFORM pg_notify('billing_account_changed', COALESCE(NEW.id, OLD.id)::text);
    ELSIF TG_TABLE_NAME = 'reservations' THEN
        IF TG_OP <> 'INSERT' THEN
            PERFORM pg_notify('billing_account_changed', OLD.account_id::text);
        END IF;
        IF TG_OP <> 'DELETE' THEN
            PERFORM pg_notify('billing_account_changed', NEW.account_id::text);
        END IF;
    ELSE
        IF TG_OP <> 'INSERT' THEN
            PERFORM pg_notify('billing_account_changed',
                              concat_ws(E'\t', OLD.account_id, OLD.username, OLD.domain));
        END IF;
        IF TG_OP <> 'DELETE' THEN
            PERFORM pg_notify('billing_account_changed',
                              concat_ws(E'\t', NEW.account_id, NEW.username, NEW.domain));
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER accounts_notify_changed
    AFTER UPDATE OF balance, currency ON accounts
    FOR EACH ROW WHEN (OLD.balance IS DISTINCT FROM NEW.balance
                       OR OLD.currency IS DISTINCT FROM NEW.currency)
    EXECUTE FUNCTION billing_notify_account_changed();

CREATE TRIGGER reservations_notify_changed
    AFTER INSERT OR DELETE OR UPDATE OF amount, account_id ON reservations
    FOR EACH ROW EXECUTE FUNCTION billing_notify_account_changed();

CREATE TRIGGER account_subscribers_notify_changed
    AFTER INSERT OR DELETE OR UPDATE ON account_subscribers
    FOR EACH ROW EXECUTE FUNCTION billing_notify_account_changed();
