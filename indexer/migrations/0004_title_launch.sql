-- A title is a launch spec: what a node runs in a session sandbox (studio titles).
ALTER TABLE titles ADD COLUMN command TEXT NOT NULL DEFAULT '';
ALTER TABLE titles ADD COLUMN args TEXT NOT NULL DEFAULT '[]';
ALTER TABLE titles ADD COLUMN workdir TEXT NOT NULL DEFAULT '';
ALTER TABLE titles ADD COLUMN env TEXT NOT NULL DEFAULT '{}';
ALTER TABLE titles ADD COLUMN needs_gpu BIGINT NOT NULL DEFAULT 0;
ALTER TABLE titles ADD COLUMN input_kinds TEXT NOT NULL DEFAULT '["keyboard","mouse","gamepad","touch"]';
