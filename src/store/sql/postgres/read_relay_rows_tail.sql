      AND writer_xid < gate.below
      AND (writer_xid, seq) > ($2::text::xid8, $3)
    -- The table's columns, not the output's writer_xid (a bigint): the index
    -- order, so that the page is read off the index without a sort.
    ORDER BY outbox_events.writer_xid, outbox_events.seq
    LIMIT $4
) AS page ON true
