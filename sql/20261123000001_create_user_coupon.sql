-- Issued coupons (CONTRACT.md §4). The worker inserts each issued coupon exactly once:
-- the UNIQUE key makes its retried inserts idempotent.
CREATE TABLE IF NOT EXISTS user_coupon (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_id BIGINT NOT NULL,
    coupon_id BIGINT NOT NULL,
    used BOOLEAN NOT NULL DEFAULT FALSE,
    issued_at DATETIME(3) NOT NULL,
    UNIQUE KEY uq_user_coupon_user_coupon (user_id, coupon_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
