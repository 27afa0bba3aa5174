"""One module per resilience concern; the order they run in is written in pipeline.py."""
