"""Shared training, data, cost-accounting and checkpoint code for the entry scripts."""
