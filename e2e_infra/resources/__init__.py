"""The lowest shared state: the lease registry with its owner proof, and ports."""
