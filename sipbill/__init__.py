"""Composition root: CLI, settings, wiring, control socket, metrics, HTTP."""
