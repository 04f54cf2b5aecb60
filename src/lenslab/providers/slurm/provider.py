"""The slurm provider: the box is a Slurm cluster's login node, reached over SSH as any machine
the user can log in to (lenslab's key, its host key pinned on first use). The cluster exists
before lenslab and is shared with others, so ``launch`` only describes the login node, and
``terminate`` (and so `lenslab down`) leaves the cluster and every job on it alone: a run is
stopped by name (`lenslab stop`), never by standing the box down.

Runs go to Slurm (``capabilities.scheduler``); `lenslab up` checks the client commands and the
shared root and installs lenslab into a venv there (lenslab.remote.slurmbox). The ``[box]``
fields that only this provider reads are checked here (lenslab.providers.slurm.fields)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from lenslab.providers.base import Capabilities
from lenslab.providers.slurm import fields
from lenslab.providers.ssh import SSHProvider

if TYPE_CHECKING:
    from lenslab.config import BoxConfig, Config
    from lenslab.remote.bootstrap import Runner
    from lenslab.remote.lab import Lab
    from lenslab.remote.labs import LabBackend


class SlurmProvider(SSHProvider):
    name = "slurm"
    # Never powered off or stopped by lenslab: the login node is the cluster's, not the user's.
    capabilities: ClassVar[Capabilities] = Capabilities(autostop="none", scheduler="slurm")
    default_root: ClassVar[str] = "~/lenslab"
    summary: ClassVar[str] = "a Slurm cluster: its login node over SSH, runs submitted with sbatch"
    starter_notes: ClassVar[str] = """\
# For provider = "slurm": host, user, port, identity_file as for "ssh" (the cluster's login node),
# and how runs are submitted.
# root = "/scratch/jdoe/lenslab"        # on the shared file system the compute nodes see
# partition = "gpu"                     # sbatch --partition (default: the cluster's default)
# account = "my-lab"                    # sbatch --account
# qos = "normal"                        # sbatch --qos
# gpus_per_run = 1                      # GPUs each run asks for (--gres=gpu:N)
# time_limit = "1-00:00:00"             # sbatch --time; runs checkpoint before it and requeue
"""

    @classmethod
    def config_problem(cls, cfg: BoxConfig) -> str | None:
        return super().config_problem(cfg) or fields.problem(cfg)

    def scheduler_lab(self, cfg: Config, runner: Runner, lab: Lab) -> LabBackend:
        """Runs as tasks of Slurm job arrays (lenslab.providers.slurm.lab)."""
        from lenslab.providers.slurm.lab import SlurmLab, job_spec

        return SlurmLab(runner, lab, job_spec(cfg), cfg.box.jupyter_port)

    def kept_note(self) -> str:
        return "; Slurm jobs were not cancelled (the cluster is shared: `lenslab stop NAME` stops a run)"
