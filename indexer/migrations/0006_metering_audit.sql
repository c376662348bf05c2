-- The sessions a node last said it runs (its heartbeat), for the checkers' metering audit.
ALTER TABLE nodes ADD COLUMN running TEXT NOT NULL DEFAULT '[]';
