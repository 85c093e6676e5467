-- The one-statement append (src/store/sql/postgres/fast_append.sql) stores
-- appends of new transactions only. When it finds anything else (a
-- transaction or append that exists, an event id that is taken) it raises
-- this, the whole statement is undone, and the writer takes the careful path.
CREATE FUNCTION outbox_fast_append_check(ok boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION 'not a fast append' USING ERRCODE = 'OBX01';
    END IF;
    RETURN true;
END
$$;
