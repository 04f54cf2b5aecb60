"""What lenslab remembers about a container box's spending, on the laptop.

One small JSON file per box (``~/.ssh/lenslab/<provider>-<box>.json``, chmod 600): the instance
lenslab launched (id, $/hour, when), and what the box's earlier instances cost in all. It is
written as soon as a create returns an id, so a failure right after still knows what bills;
``terminate`` adds the instance's cost to ``spent_usd`` and forgets the instance. A missing file
is an empty ledger; a broken one is refused (taken as empty, it would reset the budget's count).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lenslab import files
from lenslab.errors import ConfigError


@dataclass(frozen=True)
class Ledger:
    instance_id: str = ""  # "" when no instance of lenslab's is known to be billing
    price_per_hour: float = 0.0  # $/h of that instance, as agreed at launch
    gpu: str = ""
    region: str = ""
    launched_at: float | None = None  # epoch seconds; None when found running, not launched here
    spent_usd: float = 0.0  # the box's earlier instances, summed when each was terminated
    interruptible: bool = False  # the instance is a spot / bid one
    on_demand_price: float | None = None  # its offer's on-demand $/h, to compare costs with

    def hours(self, now: float | None = None) -> float | None:
        if self.launched_at is None:
            return None
        return max(0.0, ((now or time.time()) - self.launched_at) / 3600)

    def cost_now(self, now: float | None = None) -> float:
        """What the box has spent so far: earlier instances and the current one's hours."""
        return round(self.spent_usd + (self.hours(now) or 0.0) * self.price_per_hour, 4)

    def closed(self, now: float | None = None) -> Ledger:
        """The ledger after the instance was terminated: its cost moves into ``spent_usd``."""
        hours = self.hours(now) or 0.0
        spent = round(self.spent_usd + hours * self.price_per_hour, 4)
        return Ledger(spent_usd=spent)


def path(provider: str, box_name: str) -> Path:
    return files.lenslab_dir() / f"{provider}-{box_name}.json"


def read(provider: str, box_name: str) -> Ledger:
    """The box's ledger; none yet is an empty one. A file that cannot be read or parsed is
    refused: taking it as empty would reset what budget_usd has counted."""
    file = path(provider, box_name)
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        return Ledger()
    except OSError as exc:
        raise _broken(file, f"cannot read it ({exc.strerror})") from exc
    except ValueError as exc:
        raise _broken(file, "it is not JSON") from exc
    if not isinstance(raw, dict):
        raise _broken(file, "it is not a JSON object")
    try:
        launched = raw.get("launched_at")
        ledger = Ledger(
            instance_id=str(raw.get("instance_id") or ""),
            price_per_hour=float(raw.get("price_per_hour") or 0.0),
            gpu=str(raw.get("gpu") or ""),
            region=str(raw.get("region") or ""),
            launched_at=None if launched is None else float(launched),
            spent_usd=float(raw.get("spent_usd") or 0.0),
            interruptible=bool(raw.get("interruptible")),
            on_demand_price=None if raw.get("on_demand_price") is None else float(raw["on_demand_price"]),
        )
    except (TypeError, ValueError) as exc:
        raise _broken(file, "a field holds no number where one belongs") from exc
    numbers = (ledger.price_per_hour, ledger.spent_usd, ledger.launched_at or 0.0, ledger.on_demand_price or 0.0)
    if not all(0 <= n < math.inf for n in numbers):
        raise _broken(file, "a number in it is negative or not finite")
    return ledger


def _broken(file: Path, why: str) -> ConfigError:
    return ConfigError(
        f"{file}: lenslab's record of this box's spending is broken ({why})",
        "fix its JSON by hand, or delete it to count spending from zero (what it counted is then lost)",
    )


def write(provider: str, box_name: str, ledger: Ledger) -> None:
    files.ensure_dirs()
    files.write_atomic(path(provider, box_name), json.dumps(asdict(ledger)), 0o600)
