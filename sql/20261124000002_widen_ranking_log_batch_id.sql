-- Ranking-log batch ids are now the Redis log stream's key, the entry id and the entry's first
-- row (see src/ranking_log/entry.rs): longer than the 36-character UUIDs they replaced.
ALTER TABLE ranking_log_batches MODIFY batch_id VARCHAR(255) NOT NULL;
