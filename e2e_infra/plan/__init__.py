"""Which projects to run: affected by a change, and CI shards."""
