-- Reconciling Redis from MySQL (README "When Redis forgets").
--
-- "Rows of coupon X" must be cheap: reconciliation reads a coupon's holders in user_id order,
-- chunk by chunk, from this index (the UNIQUE key leads with user_id and cannot serve it).
CREATE INDEX ix_user_coupon_coupon_user ON user_coupon (coupon_id, user_id);

-- Internal to the worker: for each outbox (scope = its Redis key), the identity (run_id and
-- replication id) of the Redis last reconciled from MySQL. The persister inserts issued coupons
-- only in a transaction that holds this row in share mode and finds the identity it read its
-- outbox from; reconciliation updates the row (waiting for those transactions) before it reads
-- user_coupon. So a row read from a Redis that has since been replaced either lands before the
-- reconciliation reads (and is put back into Redis) or not at all.
CREATE TABLE IF NOT EXISTS redis_fence (
    scope VARCHAR(255) NOT NULL PRIMARY KEY,
    identity VARCHAR(100) NOT NULL,
    updated_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
