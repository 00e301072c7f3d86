"""Prometheus exposition and alert sinks."""
