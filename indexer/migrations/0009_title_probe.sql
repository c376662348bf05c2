-- A studio title's probe: the keys a checker presses to prove the title answers input
-- (JSON, `pylon_indexer_client::api::Probe`); '' when the title has none.
ALTER TABLE titles ADD COLUMN probe TEXT NOT NULL DEFAULT '';
