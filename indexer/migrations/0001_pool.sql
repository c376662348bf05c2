-- The pool, the catalog and metered sessions. Portable between SQLite and PostgreSQL:
-- text ids, BIGINT Unix seconds, JSON kept as TEXT.
CREATE TABLE titles (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    launch TEXT NOT NULL,
    min_gpu_class BIGINT NOT NULL,
    width BIGINT NOT NULL,
    height BIGINT NOT NULL,
    fps BIGINT NOT NULL
);

CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    public_key TEXT NOT NULL,
    info TEXT NOT NULL,
    capacity BIGINT NOT NULL,
    sessions BIGINT NOT NULL,
    price_per_hour DOUBLE PRECISION NOT NULL,
    gpu_class BIGINT NOT NULL,
    encode_ms DOUBLE PRECISION NOT NULL,
    titles TEXT NOT NULL,
    draining BIGINT NOT NULL,
    revoked BIGINT NOT NULL,
    last_heartbeat BIGINT NOT NULL
);

CREATE TABLE relays (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    public_key TEXT NOT NULL,
    public_url TEXT NOT NULL,
    quic_addr TEXT NOT NULL,
    region TEXT NOT NULL,
    capacity BIGINT NOT NULL,
    viewers BIGINT NOT NULL,
    node_rtt TEXT NOT NULL,
    revoked BIGINT NOT NULL,
    last_heartbeat BIGINT NOT NULL
);

CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    node TEXT NOT NULL,
    provider TEXT NOT NULL,
    relay TEXT NOT NULL,
    gpu_class BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    ended_at BIGINT,
    end_reason TEXT
);

CREATE INDEX sessions_provider ON sessions (provider);
