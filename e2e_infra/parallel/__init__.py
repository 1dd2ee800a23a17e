"""Many projects at once: the pool of warm workers, and how many at a time."""
