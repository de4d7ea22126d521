"""Webhooks: checking where an endpoint points, signing, sending, and scheduling deliveries from the outbox."""
