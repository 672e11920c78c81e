"""Integrations with other libraries (optional at runtime)."""
