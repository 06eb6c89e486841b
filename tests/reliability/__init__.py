"""Reliability: faults, hostile input, access rules, retention, load (see each module)."""
