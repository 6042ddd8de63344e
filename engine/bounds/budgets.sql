-- Named queries of the shared per-IP venue budgets (engine/bounds/budgets.py). Same block format as queries.sql.

-- budget_take --
-- Take up to $6 of budget $2 of egress group $1 (window: $4 slots of $3 seconds holding at most $5): nothing
-- unless the grant and the $8 the caller holds from slot $9 reach $7; $10, spent already, is charged first.
-- See venue_budget_take in schema.sql.
SELECT granted, slot_index, ends_in, in_window FROM venue_budget_take($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- budget_process_beat --
-- Process $1 of egress group $2 is alive: record it, forget processes silent for 10 x $3 seconds, and count
-- the other processes of the group seen in the last $3 seconds (the answer + 1 is the live count).
WITH beat AS (
    INSERT INTO venue_budget_processes (process_id, egress_group) VALUES ($1, $2)
    ON CONFLICT (process_id) DO UPDATE SET seen_at = now(), egress_group = EXCLUDED.egress_group
), gone AS (
    DELETE FROM venue_budget_processes
    WHERE seen_at < now() - make_interval(secs => $3::float8 * 10) AND process_id <> $1
)
SELECT count(*) FROM venue_budget_processes
WHERE egress_group = $2 AND process_id <> $1 AND seen_at > now() - make_interval(secs => $3::float8);

-- budget_process_gone --
-- Process $1 stops: the others stop counting it at their next beat.
DELETE FROM venue_budget_processes WHERE process_id = $1;
