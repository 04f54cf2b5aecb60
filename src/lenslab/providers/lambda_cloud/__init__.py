"""The Lambda Cloud provider: its API client (``api``) and reply shapes (``replies``), choosing
and launching an instance safely (``launch``), and the provider the CLI uses (``provider``)."""
