"""The vast provider: vast.ai instances (containers of lenslab's image on hosts of many owners).

Offers come from ``POST /bundles/`` (on-demand ``dph_total`` and interruptible ``min_bid``). A
launch rents the chosen ask (``PUT /asks/{id}/``; with ``interruptible = true`` bidding its
``min_bid`` as ``price``) with runtype "args": the container runs
``lenslab-box serve`` with port 2222 mapped (``"-p 2222:2222"`` in ``env``), labelled
``lenslab-<box>``. An instance's disk does not outlive it and vast.ai has nothing that does, so
``up`` refuses, before anything is rented, unless ``box.mirror`` names where runs are mirrored;
the box gets it as ``LENSLAB_MIRROR``, and ``lenslab train`` writes it into each run file
that names no mirror of its own (``lenslab.runmirror``). The key comes from ``VAST_API_KEY`` or
``~/.config/lenslab/vast-api-key`` (chmod 600); it travels only in the Authorization header.
``VAST_API_URL`` points at another API (a proxy, the test emulator).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from lenslab.errors import ProviderError
from lenslab.providers import container_ledger as ledgers
from lenslab.providers.base import Capabilities, OfferQuery
from lenslab.providers.container_box import LaunchPlan, LaunchSpec
from lenslab.providers.container_cloud import CloudApi, ContainerCloud
from lenslab.providers.offers import PREEMPTED, Instance, Offer, RetryPolicy
from lenslab.providers.vast.api import API_BASE, VastClient
from lenslab.providers.vast.records import InstanceSpec

if TYPE_CHECKING:
    from lenslab.config import BoxConfig

# Run at start in a stock image's container (as root): the box's key, handed in as PUBLIC_KEY.
STOCK_ONSTART = (
    'install -d -m 700 /root/.ssh && printf "%s\\n" "$PUBLIC_KEY" >> /root/.ssh/authorized_keys '
    "&& chmod 600 /root/.ssh/authorized_keys"
)
DISK_GB = 64.0  # the instance's own disk (lost when destroyed): image, caches, the current run


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

    def instance(self, instance_id: str) -> Instance | None:
        found = self.client.instance(instance_id)
        return None if found is None else found.normalised()

    def remove(self, instance_id: str) -> None:
        self.client.destroy(instance_id)


class VastProvider(ContainerCloud):
    name = "vast"
    capabilities: ClassVar[Capabilities] = Capabilities(
        rents_machines=True,
        cost=True,
        interruptible=True,
        stop_resume=True,
        container_box=True,
        offers=True,
        launches=True,
        api_key_env="VAST_API_KEY",
        api_key_file="vast-api-key",
        autostop="watch",
        autostop_inputs=True,
    )
    summary: ClassVar[str] = "a vast.ai instance (key: VAST_API_KEY or ~/.config/lenslab/vast-api-key)"
    starter_notes: ClassVar[str] = """\
# For provider = "vast": nothing on a vast.ai instance outlives it, so `lenslab up` needs a
# mirror for your runs' checkpoints (any fsspec URL the box can write to):
# mirror = "s3://my-bucket/lenslab"
# and the variables of your shell the box needs to write there (copied to a mode-600 file):
# mirror_env = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
# image = "stock" runs the pytorch/pytorch image instead, lenslab installed at `lenslab up`.
"""
    # The PyTorch project's own image (``image = "stock"``), which vast.ai's templates run.
    stock_image: ClassVar[str] = "pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel"
    api_url_env: ClassVar[str] = "VAST_API_URL"
    instance_id_env: ClassVar[str] = "CONTAINER_ID"  # set by vast.ai in every instance
    default_api_url: ClassVar[str] = API_BASE
    # Destroy, as `lenslab down` does: runs are mirrored, and a stopped instance bills its disk.
    autostop_action: ClassVar[str] = "vast-destroy"

    def _open(self, key: str, policy: RetryPolicy | None) -> VastApi:
        return VastApi(VastClient(key, self.base_url(API_BASE), policy=policy))

    def _refusal(self, cfg: BoxConfig) -> ProviderError | None:
        if cfg.mirror:
            return None
        return ProviderError(
            "vast.ai keeps nothing after an instance is gone, so lenslab launches one only when runs are "
            "mirrored; nothing was launched",
            'set box.mirror in lenslab.toml (e.g. mirror = "s3://my-bucket/lenslab"), or use provider runpod',
        )

    def _plan(self, api: CloudApi, cfg: BoxConfig, offer: Offer) -> LaunchPlan:
        return LaunchPlan(offer, (f"mirror runs to {cfg.mirror}",), offer.region)

    def _create(self, api: CloudApi, cfg: BoxConfig, plan: LaunchPlan, spec: LaunchSpec) -> str:
        assert isinstance(api, VastApi), "instances are vast.ai's own API"
        env = {**spec.env, f"-p {spec.port}:{spec.port}": "1", "LENSLAB_MIRROR": cfg.mirror or ""}
        # A stock image (no command of lenslab's) runs with vast.ai's ssh runtype: vast.ai's
        # sshd as root on port 22; ``onstart`` admits the box's key beside the account's.
        onstart = "" if spec.command else STOCK_ONSTART
        request = InstanceSpec(label=spec.name, image=spec.image, disk_gb=DISK_GB, env=env, args=spec.command,
                               onstart=onstart)  # fmt: skip
        return api.client.create_instance(plan.offer.offer_id, request, bid_price=plan.bid)

    def resume(self, cfg: BoxConfig, instance: Instance) -> None:
        """Start the instance again: a stopped one with ``state: running``; an outbid one by
        bidding again (vast.ai runs it once its bid leads)."""
        with self._api() as api:
            assert isinstance(api, VastApi), "instances are vast.ai's own API"
            if instance.interruptible and instance.state == PREEMPTED:
                bid = ledgers.read(self.name, cfg.name).price_per_hour or (instance.price_per_hour or 0.0)
                api.client.change_bid(instance.id, bid)
            else:
                api.client.start(instance.id)
