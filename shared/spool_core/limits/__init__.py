"""Token-aware rate limiting: buckets of tokens per minute and per day, a cap on concurrent jobs,
a daily budget in USD, reconciled from estimate to actual usage when a job ends."""
