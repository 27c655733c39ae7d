"""Kafka plumbing: a real local broker for development and tests."""
