"""The vast provider: vast.ai instances (containers on hosts of many owners).

Offers come from ``POST /bundles/`` (on-demand ``dph_total`` and interruptible ``min_bid``). An
instance's disk does not outlive it, so no offer has lenslab's persistent storage. The key
comes from ``VAST_API_KEY`` or ``~/.config/lenslab/vast-api-key`` (chmod 600); it travels only
in the Authorization header. ``VAST_API_URL`` points at another API (a proxy, the test emulator).
"""

from __future__ import annotations

from typing import ClassVar

from lenslab.providers.base import Capabilities, OfferQuery
from lenslab.providers.container_cloud import ContainerCloud
from lenslab.providers.offers import Instance, Offer, RetryPolicy
from lenslab.providers.vast.api import API_BASE, VastClient


class VastApi:
    """``VastClient`` as ``container_cloud.CloudApi``."""

    def __init__(self, client: VastClient) -> None:
        self.client = client

    def close(self) -> None:
        self.client.close()

    def live_offers(self, query: OfferQuery) -> list[Offer]:
        # GPU names are matched by substring afterwards; vast.ai's gpu_name filter is exact.
        return self.client.offers(interruptible=query.interruptible, min_vram_gb=query.min_vram_gb)

    def instances(self) -> list[Instance]:
        return self.client.normalised()

    def remove(self, instance_id: str) -> None:
        self.client.destroy(instance_id)


class VastProvider(ContainerCloud):
    name = "vast"
    capabilities: ClassVar[Capabilities] = Capabilities(
        rents_machines=True,
        interruptible=True,
        stop_resume=True,
        container_box=True,
        offers=True,
        launches=False,
        api_key_env="VAST_API_KEY",
        api_key_file="vast-api-key",
    )
    default_root: ClassVar[str] = "/workspace/lenslab"
    summary: ClassVar[str] = "a vast.ai instance (key: VAST_API_KEY or ~/.config/lenslab/vast-api-key)"
    api_url_env: ClassVar[str] = "VAST_API_URL"

    def _open(self, key: str, policy: RetryPolicy | None) -> VastApi:
        return VastApi(VastClient(key, self.base_url(API_BASE), policy=policy))
