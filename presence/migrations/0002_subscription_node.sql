-- presence 0002: which server process serves a subscription (its node name: host, SIP
-- address and worker number). Each one loads and NOTIFYs only its own at start-up, so with
-- several worker processes or nodes a watcher is not notified, or expired, by all of them.
-- Rows from before this migration are claimed by the first node's worker 0 that starts.
ALTER TABLE presence_subscriptions ADD COLUMN node text NOT NULL DEFAULT '';
CREATE INDEX presence_subscriptions_node ON presence_subscriptions (node);
