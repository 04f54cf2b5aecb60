"""The Lambda Cloud provider: its API client (``api``)."""
