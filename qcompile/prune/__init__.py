"""Structured channel pruning: coupled channel groups, selection criteria, budgets, the rewrite."""
