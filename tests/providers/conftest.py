"""The container-launch fixtures (a temporary HOME, a key pair, the RunPod and vast.ai
emulators) for every test here."""

from tests.providers.test_container_launch import home, key, runpod, vast

__all__ = ["home", "key", "runpod", "vast"]
