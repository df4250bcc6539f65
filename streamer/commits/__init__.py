"""Commits: the pure offset watermark tracker and the loop that commits it."""
