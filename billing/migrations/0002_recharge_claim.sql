-- billing 0002: a claim on an account's auto-recharge, so the payment provider is called
-- without holding the account row lock (or a pooled connection), yet two charges that both
-- cross the low-balance threshold still trigger one recharge. The reference is kept while a
-- recharge is in flight: after a crash the next attempt reuses it, and the provider's
-- idempotency by reference turns an already taken payment into a credit instead of a loss.
ALTER TABLE accounts
    ADD COLUMN recharge_reference  text,
    ADD COLUMN recharge_started_at timestamptz;
