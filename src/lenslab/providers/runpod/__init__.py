"""RunPod: its API client (``api``: GraphQL for pods and GPU prices, REST for network volumes)."""
