"""The snapshot command group (filled by its issue)."""
