"""Generation jobs: idempotent creation, a queue-driven worker, a durable chunk log."""
