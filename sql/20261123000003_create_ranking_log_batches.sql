-- Internal to the worker: one row per ranking_logs batch, written in the same transaction as
-- the batch. When a COMMIT's reply is lost (connection dropped, server killed) the writer retries;
-- finding its batch_id here tells it the batch already landed, so no row is written twice.
-- Rows older than 30 days are pruned by the writer.
CREATE TABLE IF NOT EXISTS ranking_log_batches (
    batch_id VARCHAR(100) NOT NULL PRIMARY KEY,
    created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    KEY ix_ranking_log_batches_created_at (created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
