-- billing 0003: a declined call (603, 403 from the callee) is a missed call too (issue 5:
-- "rejected (busy, decline)"), so the partial index behind the missed-call list covers it.
DROP INDEX cdrs_callee_missed;
CREATE INDEX cdrs_callee_missed ON cdrs (callee, start_at)
    WHERE status IN ('busy', 'no_answer', 'rejected', 'offline', 'cancelled') AND NOT seen;
