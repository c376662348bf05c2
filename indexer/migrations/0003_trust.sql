-- Trust: the newest nonce each key signed with (replays are refused), operator approval
-- of new members (--approve-new), seats held by matched sessions (taken in the same
-- statement that checks capacity, so two players can never book the last one), and when
-- the relay last reported a session's player connected (metering follows the relay).
ALTER TABLE nodes ADD COLUMN last_nonce BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN approved BIGINT NOT NULL DEFAULT 1;
ALTER TABLE nodes ADD COLUMN seats BIGINT NOT NULL DEFAULT 0;
ALTER TABLE relays ADD COLUMN last_nonce BIGINT NOT NULL DEFAULT 0;
ALTER TABLE relays ADD COLUMN approved BIGINT NOT NULL DEFAULT 1;
ALTER TABLE sessions ADD COLUMN player_seen BIGINT;
