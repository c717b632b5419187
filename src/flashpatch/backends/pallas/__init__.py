"""Pallas flash attention (placeholder)."""
