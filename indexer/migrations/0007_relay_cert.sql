-- The SHA-256 of each relay's QUIC certificate (hex): render nodes pin relays by it.
ALTER TABLE relays ADD COLUMN cert_sha256 TEXT NOT NULL DEFAULT '';
