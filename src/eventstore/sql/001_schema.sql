-- 001: the seed's three tables and the indexes the queries need.
--
-- events.position is the global order. The seed declares it BIGSERIAL; we assign it in the
-- writer instead, densely, while holding the append advisory lock (docs/design/global-order.md):
-- a sequence hands out numbers before commit, so concurrent transactions could become visible
-- out of order and a reader following positions would skip one.

CREATE TABLE IF NOT EXISTS event_streams (
    stream_id   UUID         NOT NULL,
    stream_type VARCHAR(255) NOT NULL,
    version     BIGINT       NOT NULL,
    created_at  TIMESTAMPTZ  NOT NULL,
    updated_at  TIMESTAMPTZ  NOT NULL,
    PRIMARY KEY (stream_id, stream_type)
);

CREATE TABLE IF NOT EXISTS events (
    event_id    UUID         PRIMARY KEY,
    stream_id   UUID         NOT NULL,
    stream_type VARCHAR(255) NOT NULL,
    version     BIGINT       NOT NULL,
    event_type  VARCHAR(255) NOT NULL,
    data        JSONB        NOT NULL,
    metadata    JSONB,
    created_at  TIMESTAMPTZ  NOT NULL,
    position    BIGINT       NOT NULL,
    -- GetEvents reads by (stream, version range) through this index.
    UNIQUE (stream_id, stream_type, version)
);

-- ReadAll and subscriptions read by position through this index; it also makes a duplicate
-- position impossible.
CREATE UNIQUE INDEX IF NOT EXISTS events_position_key ON events (position);

CREATE TABLE IF NOT EXISTS snapshots (
    snapshot_id UUID         PRIMARY KEY,
    stream_id   UUID         NOT NULL,
    stream_type VARCHAR(255) NOT NULL,
    version     BIGINT       NOT NULL,
    data        JSONB        NOT NULL,
    created_at  TIMESTAMPTZ  NOT NULL,
    UNIQUE (stream_id, stream_type, version)
);

-- Retention deletes by age.
CREATE INDEX IF NOT EXISTS snapshots_created_at_idx ON snapshots (created_at);
