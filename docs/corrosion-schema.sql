-- tern's RIB in Corrosion. Load it into every agent of the cluster, beside your other
-- schema files ([db] schema_paths); docs/rib-corrosion.md explains the layout.
--
-- Corrosion's rules for schema files: only CREATE TABLE and CREATE INDEX, primary-key
-- columns NOT NULL, every other NOT NULL column with a DEFAULT, no unique indexes. Changes
-- must only ever add (Corrosion ignores dropped tables and columns).

-- Every record tern follows, one row each, with the same JSON body the SQLite RIB holds.
-- tbl: apps | machines | certificates | machine_states | session_keys
-- key: the app name, machine id, certificate hostname, machine id, or key id in decimal.
CREATE TABLE IF NOT EXISTS tern_rib (
    tbl  TEXT NOT NULL,
    key  TEXT NOT NULL,
    body TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (tbl, key)
);

-- The hostnames each app row claims, so `tern apply` checks a declared hostname with one
-- lookup instead of reading every app. Kept by `tern apply` in the same transaction as the
-- app rows (a Corrosion schema holds no triggers); write apps through `tern apply`, or keep
-- this table in the same transaction yourself.
CREATE TABLE IF NOT EXISTS tern_app_hosts (
    hostname TEXT NOT NULL,
    app      TEXT NOT NULL,
    PRIMARY KEY (hostname, app)
);
