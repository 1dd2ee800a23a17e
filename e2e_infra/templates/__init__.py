"""Files that ``e2e-infra init`` writes into an adopting repository (package data)."""
