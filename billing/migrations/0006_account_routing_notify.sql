-- billing 0006: locking or unlocking an account, or changing its voicemail URI, sends
-- NOTIFY billing_account_changed with "<account id>\trouting". Nodes keep where calls *to* a
-- subscriber go in memory (billing.diversions.DiversionCache: the callee's account, whether
-- it is locked and to which voicemail its calls are then diverted), so a call between
-- subscribers costs no query, and drop the account's entry on this. Balance changes (the
-- plain "<account id>" of migration 0005, sent for every charge and reservation) leave that
-- entry alone. The balance cache (billing.balances) reads the first field only and simply
-- reads that account's balance again.
CREATE FUNCTION billing_notify_account_routing() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('billing_account_changed', NEW.id::text || E'\trouting');
    RETURN NULL;
END $$;

CREATE TRIGGER accounts_notify_routing
    AFTER UPDATE OF status, diversion_uri ON accounts
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                       OR OLD.diversion_uri IS DISTINCT FROM NEW.diversion_uri)
    EXECUTE FUNCTION billing_notify_account_routing();
