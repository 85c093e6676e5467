-- The transactions of a coalesced batch, created when new; returns each one's
-- stored token. DO UPDATE (a no-op) so that existing rows are returned too.
INSERT INTO outbox_transactions
    (producer, transaction_id, mode, state, caller_xid, caller_system_id, expires_at)
SELECT u.producer, u.transaction_id, u.mode, u.state, u.caller_xid, u.caller_system_id,
       now() + make_interval(secs => u.expires_in)
FROM UNNEST($1::text[], $2::text[], $3::smallint[], $4::smallint[], $5::bigint[], $6::bigint[],
            $7::double precision[])
    AS u(producer, transaction_id, mode, state, caller_xid, caller_system_id, expires_in)
ON CONFLICT (producer, transaction_id) DO UPDATE SET producer = EXCLUDED.producer
RETURNING producer, transaction_id, mode, state, resolution, caller_xid, caller_system_id,
          coalesce(expires_at < now(), false) AS expired
