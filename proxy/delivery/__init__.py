"""Durable delivery (SPEC 11): the store, the worker, and the sources that feed them."""
