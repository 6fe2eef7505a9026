"""The migrate command group (filled by its issue)."""
