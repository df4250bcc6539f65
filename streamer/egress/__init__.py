"""Egress: everything a worker produces (token chunks, lifecycle events, dead letters)."""
