"""A group run: several SAEs trained from one forward pass of the model per batch.

Like SAELens's ``MultiSAETrainingRunner``, each SAE has its own ``SAETrainer`` (optimizer,
schedulers, activation scaler, sparsity statistics) and the SAEs step in lockstep; unlike
it, each SAE is served exactly the batches it would get trained alone with the same seed
(group_data.py says how), so a group is a faster way to make the same SAEs, not other ones.
The launch, checks, checkpoints, mirror, stop handling and the loop's schedule are
``TrainingRun``'s (loop.py); this module builds the group and says what one step of it is.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenslab_workspace.train import checkpoint as ckpt
from lenslab_workspace.train.errors import RunConfigError
from lenslab_workspace.train.final import save_group_final, set_sae_metadata, versions
from lenslab_workspace.train.group_data import GroupStream, SharedForward, cache_size
from lenslab_workspace.train.group_state import load_group_states, restore_group, take_group_snapshot
from lenslab_workspace.train.group_wandb import group_wandb_config, log_group_end, log_group_final, log_group_step
from lenslab_workspace.train.launch import check_hook
from lenslab_workspace.train.models import check_pretrained, make_training_sae
from lenslab_workspace.train.runner import Outcome, TrainingRun
from lenslab_workspace.train.scalers import NORM_MODES, estimate_group
from lenslab_workspace.train.status import StatusFile, plain_losses
from lenslab_workspace.train.wandb_log import WandbLog, open_run

log = logging.getLogger("lenslab.train")


@dataclass
class GroupBuilt:
    trainers: dict[str, Any]  # SAE name -> SAETrainer, in the run file's order
    streams: list[GroupStream]
    stream_of: dict[str, int]  # SAE name -> index in streams
    shared: SharedForward
    resumed_from: int | None
    checkpoint: Path | None = None  # the one resumed from
    wb: WandbLog | None = None  # the group's wandb run, once training starts


class GroupRun(TrainingRun):
    def __init__(self, settings: Any, runs_dir: Path, fresh: bool = False) -> None:
        super().__init__(settings, runs_dir, fresh)
        self.members = {member.name: member for member in settings.group}
        self.cfgs: dict[str, Any] = {}

    def _new_status(self) -> StatusFile:
        total = self.settings.runner_fields.get("training_tokens", 0)
        saes = [
            {
                "name": m.name,
                "architecture": m.architecture,
                "hook_name": m.runner_fields.get("hook_name", "blocks.0.hook_mlp_out"),
                "d_sae": m.sae_fields["d_sae"],
                "losses": {},
            }
            for m in self.members.values()
        ]
        return StatusFile(self.run.status_file, self.settings.name, total, saes=saes)

    def _check_pretrained(self) -> None:
        for name, member in self.members.items():  # each SAE that continues a saved one
            try:
                check_pretrained(member)
            except RunConfigError as exc:
                reason = str(exc).removeprefix(f"{member.source}: ")
                raise RunConfigError(f"{member.source}: SAE '{name}': {reason}") from exc

    def _read_states(self, checkpoint: Path) -> dict[str, dict[str, Any]]:
        return load_group_states(checkpoint, list(self.members))

    def _check_hooks(self, model: Any) -> None:
        checked: set[str] = set()
        for name, member in self.members.items():  # once per hook: SAEs on one hook share d_in
            if self.cfgs[name].hook_name not in checked:
                check_hook(member, model, self.cfgs[name].sae.d_in)
                checked.add(self.cfgs[name].hook_name)

    def _build(self) -> GroupBuilt:  # type: ignore[override]
        found = self._find_checkpoint()
        self.cfgs = {name: member.runner_config() for name, member in self.members.items()}
        # Everything up to the SAEs is made exactly as for one SAE alone, once.
        model, tokens, exclude = self._model_and_tokens()
        cfg, fields = self.cfg, self.settings.runner_fields
        trainers, keys = self._make_trainers()
        streams: list[GroupStream] = []
        stream_of: dict[str, int] = {}
        index_of: dict[tuple[str, bytes, bool], int] = {}
        hooks = [key[0] for key in keys.values()]
        shared = SharedForward(model, hooks, fields, keep=cache_size(fields, len(set(keys.values()))))
        for name, key in keys.items():
            if key not in index_of:
                index_of[key] = len(streams)
                rng = torch.frombuffer(bytearray(key[1]), dtype=torch.uint8).clone()
                member_fields = self.members[name].runner_fields
                streams.append(
                    GroupStream(model, tokens, member_fields, self.cfgs[name].sae.d_in, exclude, shared, rng)
                )
            stream_of[name] = index_of[key]
        log.info("group of %d SAEs over %d hooks, %d mixing streams", len(trainers), len(set(hooks)), len(streams))
        if found is None:
            log.info("starting run '%s' from scratch", self.settings.name)
            return GroupBuilt(trainers, streams, stream_of, shared, None)
        restore_group(trainers, streams, found.path, str(cfg.device), found.states)
        step, samples = found.manifest["step"], found.manifest["n_training_samples"]
        log.info("resuming from %s (step %d, %d tokens)", found.path.name, step, samples)
        return GroupBuilt(trainers, streams, stream_of, shared, step, found.path)

    def _make_trainers(self) -> tuple[dict[str, Any], dict[str, tuple[str, bytes, bool]]]:
        """Each SAE made from the RNG state it would be made from alone; its stream's key."""
        from sae_lens.training.sae_trainer import SAETrainer

        before = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        trainers: dict[str, Any] = {}
        keys: dict[str, tuple[str, bytes, bool]] = {}
        for name, member in self.members.items():
            random.setstate(before[0])
            np.random.set_state(before[1])
            torch.set_rng_state(before[2])
            cfg = self.cfgs[name]
            sae = make_training_sae(member, cfg)
            set_sae_metadata(sae, cfg)
            sae.to(cfg.device)
            trainers[name] = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=iter(()))
            reads_norm_batches = sae.cfg.normalize_activations in NORM_MODES
            keys[name] = (str(cfg.hook_name), torch.get_rng_state().numpy().tobytes(), reads_norm_batches)
        return trainers, keys

    def _train(self, built: GroupBuilt) -> Outcome:  # type: ignore[override]
        trainers = built.trainers
        first = next(iter(trainers.values()))  # the SAEs step in lockstep: its counters are the group's
        writer = self._begin(built.resumed_from, list(trainers.values()))
        wb_config = group_wandb_config(self.cfgs, self.settings.logger_fields)
        logger_fields = self.settings.logger_fields
        built.wb = open_run(wb_config, logger_fields, self.run.root, built.checkpoint, first.n_training_steps)
        estimate_group(trainers, built.streams, built.stream_of)

        def save() -> str:
            for stream in built.streams:  # their prefetch threads stop
                stream.close()
            built.streams[0].finish()  # the token array they share is completed
            if built.wb is not None:
                log_group_end(built.wb, trainers)
            save_group_final(trainers, self.cfgs, self.run, versions())
            if built.wb is not None:
                log_group_final(built.wb, trainers, self.cfgs, self.run.final)
            return f"finished: the {len(trainers)} SAEs are in {self.run.final}/<name>"

        def snapshot() -> ckpt.Snapshot:
            return self._group_snapshot(built)

        try:
            stopped = self._steps(first, writer, lambda: self._step(built), snapshot, self._record_losses)
            return self._conclude(stopped, first, writer, snapshot, save)
        except BaseException:
            with contextlib.suppress(BaseException):
                writer.wait()
            raise
        finally:
            for stream in built.streams:  # their prefetch threads, if any, stop
                stream.close()
            if built.wb is not None:
                built.wb.close()

    def _step(self, built: GroupBuilt) -> dict[str, Any]:
        """One step of every SAE, in lockstep (the order of SAELens's SAETrainer.fit for each)."""
        sparsity = {name: t.maybe_reset_sparsity() for name, t in built.trainers.items()}
        batches = [next(stream) for stream in built.streams]
        outputs = {name: t.step(batches[built.stream_of[name]]) for name, t in built.trainers.items()}
        if built.wb is not None:
            log_group_step(built.wb, built.trainers, outputs, {n: w for n, w in sparsity.items() if w})
        for trainer in built.trainers.values():
            trainer.n_training_steps += 1
        return outputs

    def _group_snapshot(self, built: GroupBuilt) -> ckpt.Snapshot:
        snapshot = take_group_snapshot(built.trainers, built.streams, self.config_hash, versions())
        if built.wb is not None:
            built.wb.add_to(snapshot)  # the wandb run id and the newest records travel with the checkpoint
        return snapshot

    def _record_losses(self, outputs: dict[str, Any]) -> dict[str, float]:
        """Each SAE's latest losses into status.json's ``saes``; the first SAE's are returned."""
        assert self.status is not None
        entries = self.status.fields["saes"]
        for entry in entries:
            out = outputs[entry["name"]]
            entry["losses"] = plain_losses(out.losses)
        return dict(entries[0]["losses"]) if entries else {}
