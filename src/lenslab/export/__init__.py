"""Runs as tasks for other schedulers: ``lenslab export skypilot`` (lenslab.export.skypilot)."""
