"""Foundations every other package uses: the user-error types, atomic file writes and disk-full
messages, hub reachability, directory listings and sizes. No torch, no transformers."""
