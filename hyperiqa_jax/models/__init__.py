"""Linen model definitions."""
