-- One row per decided coupon request (CONTRACT.md §4). `rank` is a reserved word in MySQL 8,
-- hence the backticks.
CREATE TABLE IF NOT EXISTS ranking_logs (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_id BIGINT NOT NULL,
    coupon_type VARCHAR(50) NOT NULL,
    `rank` INT NOT NULL,
    `timestamp` TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    status ENUM('ISSUED', 'FAILED') NOT NULL,
    reason VARCHAR(32) NULL,
    retry_count INT NOT NULL DEFAULT 0,
    KEY ix_ranking_logs_coupon_rank (coupon_type, `rank`)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
