"""The device's persistent state: one SQLite database (outbox, installed models, deployments, nonces)."""
