"""Compositions of adapters: merge (weighted sums into one new adapter), stack, mixture, and the compose() door."""
