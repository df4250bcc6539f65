"""Health: readiness, liveness and the stall watchdog."""
