"""The placement command group (filled by its issue)."""
