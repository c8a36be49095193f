"""Analyses of what the gates and the policies keep."""
