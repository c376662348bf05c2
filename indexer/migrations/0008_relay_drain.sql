-- A relay that is draining (SIGTERM: its viewers are moving to other relays) gets no new
-- viewers. Set by the relay itself; a new registration (the relay restarted) clears it.
ALTER TABLE relays ADD COLUMN draining BIGINT NOT NULL DEFAULT 0;
