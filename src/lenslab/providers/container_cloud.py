"""What the RunPod and vast.ai providers share: clouds whose instances are containers.

Such an instance has no Docker engine inside, so lenslab's usual box (bootstrap, image, dev
container) does not apply; the runner that sets one up is not built yet. Until it is, ``launch``
refuses with one line, and everything that is cheap and safe with the API clients works:
live offers, finding lenslab's instances by name (``lenslab-<box>``), reaching one over SSH, and
terminating every one of them (``lenslab down``: nothing bills silently).

Each subclass says how to open its API client and map it onto ``CloudApi``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from lenslab import files
from lenslab.errors import ConfigError, ProviderError
from lenslab.providers.base import OfferQuery, Provider, not_built
from lenslab.providers.offers import TERMINATED, Instance, Offer, RetryPolicy

if TYPE_CHECKING:
    from lenslab.config import BoxConfig
    from lenslab.records import Box
    from lenslab.remote.bootstrap import Runner

CONTAINER_USER = "root"  # the user sshd admits in both clouds' containers
# Listing offers is a question, not a task: a provider that does not answer soon is reported
# as failing while the others show, rather than retried for half a minute.
OFFERS_POLICY = RetryPolicy(max_attempts=3, initial_backoff=0.25, max_backoff=1.0)


class CloudApi(Protocol):
    """The part of a provider's API client these providers use, in normalised records."""

    def close(self) -> None: ...

    def live_offers(self, query: OfferQuery) -> list[Offer]: ...

    def instances(self) -> list[Instance]: ...

    def remove(self, instance_id: str) -> None: ...


class ContainerCloud(Provider):
    # Set by each subclass: the environment variable naming its API's base URL (tests, proxies).
    api_url_env: ClassVar[str]

    def __init__(self, api: CloudApi | None = None) -> None:
        self._given = api  # given (tests): used as is and left open
        self.seen: list[Instance] = []

    def _open(self, key: str, policy: RetryPolicy | None) -> CloudApi:
        raise NotImplementedError

    @contextlib.contextmanager
    def _api(self, policy: RetryPolicy | None = None) -> Iterator[CloudApi]:
        if self._given is not None:
            yield self._given
            return
        key = self.api_key()
        if not key:
            raise ConfigError(f"no {self.name} API key: {self.key_hint()} (chmod 600)")
        api = self._open(key, policy)
        try:
            yield api
        finally:
            api.close()

    @classmethod
    def base_url(cls, default: str) -> str:
        return os.environ.get(cls.api_url_env) or default

    def offers(self, query: OfferQuery) -> list[Offer]:
        with self._api(OFFERS_POLICY) as api:
            found = api.live_offers(query)
        return [o for o in found if query.accepts(o)]

    def launch(self, cfg: BoxConfig) -> Box:
        raise not_built(self.name)

    def launch_offer(self, cfg: BoxConfig, offer: Offer) -> Box:
        raise not_built(self.name)

    def get(self, cfg: BoxConfig) -> Box | None:
        """lenslab's running (or starting) instance for the box; None when there is none."""
        with self._api() as api:
            self.seen = [i for i in api.instances() if i.name == cfg.alias and i.state != TERMINATED]
        if not self.seen:
            return None
        best = next((i for i in self.seen if i.ssh_host), self.seen[0])
        return self._box(cfg, best)

    def connect(self, box: Box, *, attempts: int | None = None) -> Runner:
        from lenslab.providers.ssh import target
        from lenslab.remote.ssh import CONNECT_ATTEMPTS, SSHLink

        if not box.host:
            raise ProviderError(f"instance {box.alias} has no SSH address yet", "try again in a minute")
        return SSHLink.connect(target(box), attempts=CONNECT_ATTEMPTS if attempts is None else attempts)

    def terminate(self, box: Box) -> None:
        """Every instance named for the box, whatever its state: each one may bill."""
        with self._api() as api:
            for instance in api.instances():
                if instance.name == box.alias and instance.state != TERMINATED:
                    api.remove(instance.id)

    def instances_seen(self) -> list[dict[str, object]]:
        return [
            {"id": i.id, "status": i.state, "instance_type": i.gpu_name, "region": "",
             "price_per_hour_usd": i.price_per_hour or 0.0}
            for i in self.seen
        ]  # fmt: skip

    def _box(self, cfg: BoxConfig, instance: Instance) -> Box:
        from lenslab.records import Box

        host = instance.ssh_host
        if host is not None:
            try:
                host = str(ipaddress.ip_address(host))
            except ValueError:
                host = None  # written into the ssh config: an IP address and nothing else
        return Box(
            name=cfg.name,
            provider=self.name,
            alias=cfg.alias,
            root=cfg.persistent_root,
            host=host,
            port=instance.ssh_port or 22,
            user=cfg.user or CONTAINER_USER,
            identity_file=Path(cfg.identity_file).expanduser() if cfg.identity_file else files.default_key_path(),
        )
