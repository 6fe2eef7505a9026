"""Reconcile: pure planners (plan, merge, policy) and the executor (apply)."""
