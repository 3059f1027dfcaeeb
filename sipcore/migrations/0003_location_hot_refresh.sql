-- A registration refresh rewrites expires_at, cseq and received_at of its row: the most
-- frequent write of the whole system.  With expires_at indexed no such update could be HOT
-- (heap-only: no new index entries), so every refresh added an entry to both indexes and left
-- a dead tuple for autovacuum (measured under bench/sip_load.py with 100,000 contacts: 0 of
-- 44,560 updates HOT, autovacuum every ~20 s).  The index served only the start-up DELETE of
-- rows that expired while no node ran, a sequential scan once per start; expiry deletes and
-- reloads go by the primary key.  Free space on every page (fillfactor) lets the new version
-- of a row stay on its page.
DROP INDEX IF EXISTS location_expires_at;
ALTER TABLE location SET (fillfactor = 75);
