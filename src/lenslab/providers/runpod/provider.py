"""The runpod provider: RunPod pods (containers of lenslab's image) with a network volume as
persistent storage.

Offers come from GraphQL ``gpuTypes`` (on-demand price and minimum spot bid per GPU type). A
launch deploys an on-demand pod (``podFindAndDeployOnDemand``), or with ``interruptible = true``
a spot pod bidding the minimum bid (``podRentInterruptable``), named ``lenslab-<box>`` with the
network volume ``lenslab-<project>`` mounted at /lab. A volume is bound to its data center, so
the pod goes where the volume is; a new volume goes to the first data center with the GPU free.
The volume is created after consent when missing, reused by later pods, kept by ``down``, and
deleted only by ``down --purge`` after a yes. The key comes from ``RUNPOD_API_KEY`` or
``~/.config/lenslab/runpod-api-key`` (chmod 600); it travels only in the Authorization header.
``RUNPOD_API_URL`` / ``RUNPOD_REST_URL`` point at another GraphQL / REST endpoint (a proxy, the
test emulator).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from lenslab.errors import ProviderError
from lenslab.providers import container_ledger as ledgers
from lenslab.providers.base import Capabilities, OfferQuery
from lenslab.providers.container_box import LaunchPlan, LaunchSpec
from lenslab.providers.container_cloud import CloudApi, ContainerCloud
from lenslab.providers.offers import CloudError, CloudNoCapacity, CloudOutcomeUnknown, Instance, Offer, RetryPolicy
from lenslab.providers.runpod.api import GRAPHQL_URL, REST_URL, RunPodClient
from lenslab.providers.runpod.records import NetworkVolume, PodSpec

if TYPE_CHECKING:
    from lenslab.config import BoxConfig

REST_URL_ENV = "RUNPOD_REST_URL"
VOLUME_GB = 50  # a new network volume's size: checkpoints, runs and the Hugging Face cache
# Data centers with network volumes (docs.runpod.io, "Network volumes"), tried in this order
# for a new volume when box.regions does not name any.
DATA_CENTERS = (
    "EU-RO-1", "EU-SE-1", "EU-CZ-1", "EU-NL-1", "EUR-IS-1", "US-GA-1", "US-GA-2", "US-TX-3",
    "US-KS-2", "US-IL-1", "US-CA-2", "US-DE-1", "CA-MTL-1", "CA-MTL-3", "AP-JP-1", "OC-AU-1",
)  # fmt: skip


def volume_name(cfg: BoxConfig) -> str:
    return f"lenslab-{cfg.project or cfg.name}"


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

    def instance(self, instance_id: str) -> Instance | None:
        pod = self.client.pod(instance_id)
        return None if pod is None else pod.instance()

    def remove(self, instance_id: str) -> None:
        self.client.terminate(instance_id)


class RunPodProvider(ContainerCloud):
    name = "runpod"
    capabilities: ClassVar[Capabilities] = Capabilities(
        rents_machines=True,
        cost=True,
        persistent_volumes=True,
        interruptible=True,
        stop_resume=True,
        container_box=True,
        offers=True,
        launches=True,
        api_key_env="RUNPOD_API_KEY",
        api_key_file="runpod-api-key",
        autostop="watch",
        autostop_inputs=True,
    )
    summary: ClassVar[str] = "a RunPod pod (key: RUNPOD_API_KEY or ~/.config/lenslab/runpod-api-key)"
    starter_notes: ClassVar[str] = """\
# For provider = "runpod": the pod runs lenslab's image; your data lives on the network volume
# lenslab-<project> (mounted at /lab, kept by `lenslab down`, deleted by `lenslab down --purge`).
# image = "stock" runs RunPod's own PyTorch image instead: `lenslab up` installs lenslab into a
# venv on the volume at first start (from build_context) and reuses it later.
"""
    # RunPod's stock PyTorch image (``image = "stock"``): its /start.sh puts PUBLIC_KEY into
    # root's authorized_keys and starts sshd on port 22.
    stock_image: ClassVar[str] = "runpod/pytorch:2.8.0-py3.11-cuda12.8.1-cudnn-devel-ubuntu22.04"
    api_url_env: ClassVar[str] = "RUNPOD_API_URL"
    instance_id_env: ClassVar[str] = "RUNPOD_POD_ID"  # set by RunPod in every pod
    default_api_url: ClassVar[str] = GRAPHQL_URL
    # Terminate, as `lenslab down` does: the network volume keeps the data, and a stopped pod
    # would still bill for its disk.
    autostop_action: ClassVar[str] = "runpod-terminate"

    def _open(self, key: str, policy: RetryPolicy | None) -> RunPodApi:
        rest = os.environ.get(REST_URL_ENV) or REST_URL
        return RunPodApi(RunPodClient(key, self.base_url(GRAPHQL_URL), rest, policy=policy))

    @staticmethod
    def _client(api: CloudApi) -> RunPodClient:
        assert isinstance(api, RunPodApi), "pods and volumes are RunPod's own API"
        return api.client

    def _plan(self, api: CloudApi, cfg: BoxConfig, offer: Offer) -> LaunchPlan:
        """Where the pod goes: the volume's data center, else the first with the GPU free."""
        client, name = self._client(api), volume_name(cfg)
        volume = next((v for v in client.network_volumes() if v.name == name), None)
        if volume is not None:
            if not self._has_stock(client, offer, volume.data_center_id):
                raise CloudNoCapacity(
                    f"RunPod has no {offer.gpu_name} free in {volume.data_center_id}, where your network volume "
                    f"{name} is (a volume cannot move)",
                    "choose another GPU type (box.gpu_types, `lenslab offers`), or retry later",
                    code="runpod/no-capacity",
                )
            return LaunchPlan(offer, (), volume.data_center_id, {"volume": volume})
        for center in self._candidates(cfg, offer):
            if self._has_stock(client, offer, center):
                extra = f"create network volume {name} ({VOLUME_GB} GB, billed per GB-month) there"
                return LaunchPlan(offer, (extra,), center, {"volume": None})
        raise CloudNoCapacity(
            f"RunPod has no {offer.gpu_name} free in a data center with network volumes",
            "choose another GPU type (box.gpu_types, `lenslab offers`), or retry later",
            code="runpod/no-capacity",
        )

    @staticmethod
    def _candidates(cfg: BoxConfig, offer: Offer) -> tuple[str, ...]:
        if offer.region:
            return (offer.region,)
        if cfg.regions:
            return tuple(r.upper() for r in cfg.regions)  # box.regions is lower case; RunPod's ids are not
        return DATA_CENTERS

    @staticmethod
    def _has_stock(client: RunPodClient, offer: Offer, center: str) -> bool:
        types = client.gpu_types(gpu_count=max(offer.gpu_count, 1), data_center_id=center)
        return any(t.id == offer.offer_id and t.stock_status is not None for t in types)

    def _create(self, api: CloudApi, cfg: BoxConfig, plan: LaunchPlan, spec: LaunchSpec) -> str:
        client = self._client(api)
        volume = plan.details.get("volume") or self._ensure_volume(client, volume_name(cfg), plan.where)
        pod = PodSpec(
            name=spec.name,
            image_name=spec.image,
            gpu_type_id=plan.offer.offer_id,
            gpu_count=max(plan.offer.gpu_count, 1),
            cloud_type="SECURE",  # network volumes live in Secure Cloud data centers
            data_center_id=plan.where,
            network_volume_id=volume.id,
            volume_mount_path="/lab",
            ports=f"{spec.port}/tcp",
            env=spec.env,
            docker_args=shlex.join(spec.command),
        )
        if plan.bid is not None:
            # A spot pod (runpod-python's podRentInterruptable): the same input plus bidPerGpu.
            return client.rent_interruptible(pod, round(plan.bid / pod.gpu_count, 4)).id
        return client.deploy(pod).id

    def resume(self, cfg: BoxConfig, instance: Instance) -> None:
        """Start an exited pod again: a spot pod with its bid (podBidResume), else podResume."""
        with self._api() as api:
            client = self._client(api)
            count = max(instance.gpu_count, 1)
            if instance.interruptible:
                bid = ledgers.read(self.name, cfg.name).price_per_hour or (instance.price_per_hour or 0.0)
                client.bid_resume(instance.id, count, round(bid / count, 4))
            else:
                client.resume(instance.id, count)

    @staticmethod
    def _ensure_volume(client: RunPodClient, name: str, center: str) -> NetworkVolume:
        """The volume called ``name``, created when missing; one whose create reply was lost is
        found by its name, and created once more only when it is not there."""
        for attempt in (1, 2):
            existing = next((v for v in client.network_volumes() if v.name == name), None)
            if existing is not None:
                return existing
            try:
                return client.create_network_volume(name, VOLUME_GB, center)
            except CloudOutcomeUnknown:
                if attempt == 2:
                    raise
            except CloudError:
                found = next((v for v in client.network_volumes() if v.name == name), None)
                if found is None:
                    raise
                return found
        raise AssertionError("unreachable: the last attempt returns or raises")

    def kept_note(self) -> str:
        return " (the network volume stays, billed by RunPod per GB-month; `lenslab down --purge` deletes it)"

    def purge(self, cfg: BoxConfig, ask: Callable[[str], bool], assume_yes: bool) -> str | None:
        """Delete the network volume lenslab-<project> (all its data) after an explicit yes."""
        name = volume_name(cfg)
        with self._api() as api:
            client = self._client(api)
            volume = next((v for v in client.network_volumes() if v.name == name), None)
            if volume is None:
                return None
            where = f"{name} in {volume.data_center_id}"
            if not assume_yes and not ask(f"delete network volume {where} and ALL data on it? [y/N] "):
                raise ProviderError(f"network volume {name} was not deleted", "re-run with --purge --yes to delete it")
            client.delete_network_volume(volume.id)
        return f"network volume {name}"
