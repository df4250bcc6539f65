"""The OpenAI-compatible HTTP gateway over the Kafka fleet (docs/gateway.md)."""
