-- Sessions are looked up by node (capacity, sweeping) and by relay (ended tokens).
CREATE INDEX sessions_node ON sessions (node, ended_at);
CREATE INDEX sessions_relay ON sessions (relay, ended_at);
