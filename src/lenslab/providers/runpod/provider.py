"""The runpod provider: RunPod pods (containers) with a network volume as persistent storage.

Offers come from GraphQL ``gpuTypes`` (on-demand price and minimum spot bid per GPU type). The
key comes from ``RUNPOD_API_KEY`` or ``~/.config/lenslab/runpod-api-key`` (chmod 600); it travels
only in the Authorization header. ``RUNPOD_API_URL`` / ``RUNPOD_REST_URL`` point at another
GraphQL / REST endpoint (a proxy, the test emulator).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from lenslab.errors import ProviderError
from lenslab.providers.base import Capabilities, OfferQuery
from lenslab.providers.container_cloud import ContainerCloud
from lenslab.providers.offers import Instance, Offer, RetryPolicy
from lenslab.providers.runpod.api import GRAPHQL_URL, REST_URL, RunPodClient

if TYPE_CHECKING:
    from lenslab.config import BoxConfig

REST_URL_ENV = "RUNPOD_REST_URL"


class RunPodApi:
    """``RunPodClient`` as ``container_cloud.CloudApi``."""

    def __init__(self, client: RunPodClient) -> None:
        self.client = client

    def close(self) -> None:
        self.client.close()

    def live_offers(self, query: OfferQuery) -> list[Offer]:
        # One GPU per pod: lenslab trains on one GPU; the price per GPU-hour is what compares.
        return self.client.offers(gpu_count=1)

    def instances(self) -> list[Instance]:
        return self.client.instances()

    def remove(self, instance_id: str) -> None:
        self.client.terminate(instance_id)


class RunPodProvider(ContainerCloud):
    name = "runpod"
    capabilities: ClassVar[Capabilities] = Capabilities(
        rents_machines=True,
        persistent_volumes=True,
        interruptible=True,
        stop_resume=True,
        container_box=True,
        offers=True,
        launches=False,
        api_key_env="RUNPOD_API_KEY",
        api_key_file="runpod-api-key",
    )
    default_root: ClassVar[str] = "/workspace/lenslab"  # the network volume's mount in a pod
    summary: ClassVar[str] = "a RunPod pod (key: RUNPOD_API_KEY or ~/.config/lenslab/runpod-api-key)"
    api_url_env: ClassVar[str] = "RUNPOD_API_URL"

    def _open(self, key: str, policy: RetryPolicy | None) -> RunPodApi:
        rest = os.environ.get(REST_URL_ENV) or REST_URL
        return RunPodApi(RunPodClient(key, self.base_url(GRAPHQL_URL), rest, policy=policy))

    def kept_note(self) -> str:
        return " (the network volume stays, billed by RunPod per GB-month; `lenslab down --purge` deletes it)"

    def purge(self, cfg: BoxConfig, ask: Callable[[str], bool], assume_yes: bool) -> str | None:
        """Delete the network volume lenslab-<project> (all its data) after an explicit yes."""
        name = f"lenslab-{cfg.project or cfg.name}"
        with self._api() as api:
            assert isinstance(api, RunPodApi), "volumes are RunPod's own API"
            volume = next((v for v in api.client.network_volumes() if v.name == name), None)
            if volume is None:
                return None
            where = f"{name} in {volume.data_center_id}"
            if not assume_yes and not ask(f"delete network volume {where} and ALL data on it? [y/N] "):
                raise ProviderError(f"network volume {name} was not deleted", "re-run with --purge --yes to delete it")
            api.client.delete_network_volume(volume.id)
        return f"network volume {name}"
