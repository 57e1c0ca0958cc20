"""Spiders of the demo project: ``demo`` plus one spider per contention point."""
