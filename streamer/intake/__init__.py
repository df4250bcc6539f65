"""Intake: consume, decode, validate, prepare (template, tokens, limits), backpressure, dedup."""
