"""The store: its layout, locks, atomic writes and space checks; probe caches."""
