-- Checkers (approved by the operator) audit nodes: each check is a session opened for the
-- checker on a node's free capacity; its signed report decides the node's verdict.
CREATE TABLE checkers (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    public_key TEXT NOT NULL,
    approved BIGINT NOT NULL,
    revoked BIGINT NOT NULL,
    last_nonce BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);

CREATE TABLE checks (
    id TEXT PRIMARY KEY,
    checker TEXT NOT NULL,
    node TEXT NOT NULL,
    session TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    report_by BIGINT NOT NULL,
    reported_at BIGINT,
    passed BIGINT,
    outcome TEXT
);

CREATE INDEX checks_node ON checks (node, reported_at);
-- unchecked | passing | suspect | failed; when the node is next due for a check.
ALTER TABLE nodes ADD COLUMN verdict TEXT NOT NULL DEFAULT 'unchecked';
ALTER TABLE nodes ADD COLUMN next_check BIGINT NOT NULL DEFAULT 0;
-- play | check: a checker's session holds a seat but is not a provider's paid play.
ALTER TABLE sessions ADD COLUMN kind TEXT NOT NULL DEFAULT 'play';
