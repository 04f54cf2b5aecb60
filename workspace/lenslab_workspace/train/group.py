"""A group run: several SAEs trained from one forward pass of the model per batch.

Like SAELens's ``MultiSAETrainingRunner``, each SAE has its own ``SAETrainer`` (optimizer,
schedulers, activation scaler, sparsity statistics) and the SAEs step in lockstep; unlike
it, each SAE is served exactly the batches it would get trained alone with the same seed
(group_data.py says how), so a group is a faster way to make the same SAEs, not other ones.
The launch, checks, checkpoints, mirror and stop handling are ``TrainingRun``'s; this module
builds the group and runs its loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenslab.contract import EXIT_FINISHED, EXIT_INTERRUPTED
from lenslab_workspace.train import checkpoint as ckpt
from lenslab_workspace.train.atomic import write_json_atomic
from lenslab_workspace.train.data import materialize_tokens, sequences_needed
from lenslab_workspace.train.errors import CheckpointError
from lenslab_workspace.train.final import save_group_final, set_sae_metadata
from lenslab_workspace.train.group_data import GroupStream, SharedForward
from lenslab_workspace.train.group_state import load_group_states, restore_group, take_group_snapshot
from lenslab_workspace.train.launch import check_hook
from lenslab_workspace.train.models import load_language_model, make_training_sae
from lenslab_workspace.train.progress import Progress, RateWindow
from lenslab_workspace.train.runner import Outcome, TrainingRun, build_exclude_tokens, seed_everything, versions
from lenslab_workspace.train.status import StatusFile

log = logging.getLogger("lenslab.train")

NORM_MODES = ("expected_average_only_in", "covariance_whitening")  # they read batches first


@dataclass
class GroupBuilt:
    trainers: dict[str, Any]  # SAE name -> SAETrainer, in the run file's order
    streams: list[GroupStream]
    stream_of: dict[str, int]  # SAE name -> index in streams
    shared: SharedForward
    resumed_from: int | None


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

    def _read_states(self, checkpoint: Path) -> dict[str, dict[str, Any]]:
        return load_group_states(checkpoint, list(self.members))

    def _build(self) -> GroupBuilt:  # type: ignore[override]
        found = self._find_checkpoint()
        for note in self.settings.notes:
            log.info(note)
        if self.settings.resilience.exact:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.cfgs = {name: member.runner_config() for name, member in self.members.items()}
        cfg, fields = self.cfg, self.settings.runner_fields
        # Everything up to the SAE is made exactly as for one SAE alone, once.
        seed_everything(cfg.seed)
        model, tokenizer, tokenizer_name = load_language_model(self.settings, str(cfg.llm_device))
        checked: set[str] = set()
        for name, member in self.members.items():  # once per hook: SAEs on one hook share d_in
            if self.cfgs[name].hook_name not in checked:
                check_hook(member, model, self.cfgs[name].sae.d_in)
                checked.add(self.cfgs[name].hook_name)
        stream_context = len(range(cfg.context_size)[slice(*cfg.seqpos_slice)])
        exclude = build_exclude_tokens(fields, tokenizer)
        tokens = materialize_tokens(
            fields,
            model,
            tokenizer,
            self.run.data_dir,
            tokenizer_name,
            sequences_needed(fields, stream_context),
            reuse_from=(self.target.data_dir,) if self.run is not self.target else (),
            exclude_tokens=exclude,
        )
        trainers, keys = self._make_trainers()
        streams: list[GroupStream] = []
        stream_of: dict[str, int] = {}
        index_of: dict[tuple[str, bytes, bool], int] = {}
        hooks = [key[0] for key in keys.values()]
        shared = SharedForward(model, hooks, fields, keep=len(set(keys.values())) + 1)
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
        return GroupBuilt(trainers, streams, stream_of, shared, step)

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

    def _estimate_scalers(self, built: GroupBuilt) -> None:
        """As ``_estimate_scaler_if_needed`` alone: each stream's first batches, once per stream."""
        for index, stream in enumerate(built.streams):
            names = [n for n, i in built.stream_of.items() if i == index]
            needs = [n for n in names if _needs_estimate(built.trainers[n])]
            if not needs:
                continue
            n_batches = built.trainers[needs[0]].cfg.n_batches_for_norm_estimate
            batches = [next(stream) for _ in range(n_batches)]
            for name in needs:
                trainer = built.trainers[name]
                scaler, d_in = trainer.activation_scaler, trainer.sae.cfg.d_in
                if trainer.sae.cfg.normalize_activations == "expected_average_only_in":
                    scaler.estimate_scaling_factor(
                        d_in=d_in, data_provider=iter(batches), n_batches_for_norm_estimate=n_batches
                    )
                else:
                    scaler.estimate_whitening(
                        d_in=d_in, data_provider=iter(batches), n_batches_for_norm_estimate=n_batches
                    )

    def _train(self, built: GroupBuilt) -> Outcome:  # type: ignore[override]
        trainers, res, status = built.trainers, self.settings.resilience, self.status
        first = next(iter(trainers.values()))
        total = first.cfg.total_training_samples
        assert status is not None
        status.update(state="running", step=first.n_training_steps, tokens_done=first.n_training_samples)
        status.update(resumed_from_step=built.resumed_from)
        status.write()
        if self.mirror is not None:
            from lenslab_workspace.train.mirror import MirrorUploader

            self.uploader = MirrorUploader(self.mirror, res.mirror_max_consecutive_failures, res.mirror_retry_seconds)
        retain = self.uploader.retain(self.run.checkpoints, res.keep_last) if self.uploader is not None else None
        writer = ckpt.CheckpointWriter(self.run.checkpoints, res.keep_last, self._after_commit, retain)
        for trainer in trainers.values():
            trainer.optimizer.register_step_pre_hook(lambda *_: writer.wait_staged())
        self._estimate_scalers(built)
        progress = Progress(total, first.n_training_samples)
        window = RateWindow(time.monotonic(), first.n_training_samples)
        last_checkpoint_time, last_checkpoint_tokens = time.monotonic(), first.n_training_samples
        last_status = 0.0
        try:
            while first.n_training_samples < total:
                outputs = self._step(built)
                if self.stop.requested or self._mirror_failed():
                    break
                now = time.monotonic()
                tokens_due = res.checkpoint_every_tokens is not None and (
                    first.n_training_samples - last_checkpoint_tokens >= res.checkpoint_every_tokens
                )
                if tokens_due or now - last_checkpoint_time >= res.checkpoint_every_seconds:
                    writer.submit(self._group_snapshot(built))
                    last_checkpoint_time, last_checkpoint_tokens = now, first.n_training_samples
                if now - last_status >= res.status_every_seconds:
                    last_status = now
                    rate = window.rate(now, first.n_training_samples)
                    losses = self._record_losses(outputs)
                    self._report(first, writer, rate, losses)
                    progress.update(first.n_training_samples, first.n_training_steps, losses, rate)
            if first.n_training_samples < total and (self.stop.requested or self._mirror_failed()):
                return self._stopped(built, writer)
            writer.wait()
            if not self.run.config_file.exists():  # a run too short for a checkpoint: pin it now
                write_json_atomic(self.run.config_file, self.settings.comparable())
            save_group_final(trainers, self.cfgs, self.run, versions())
            self._close_uploader()
            self._report(first, writer, None, {}, state="finished", message=None)
            return Outcome(EXIT_FINISHED, f"finished: the {len(trainers)} SAEs are in {self.run.final}/<name>")
        except BaseException:
            with contextlib.suppress(BaseException):
                writer.wait()
            raise
        finally:
            progress.close()

    def _step(self, built: GroupBuilt) -> dict[str, Any]:
        """One step of every SAE, in lockstep (the order of SAELens's SAETrainer.fit for each)."""
        for trainer in built.trainers.values():
            trainer.maybe_reset_sparsity()
        batches = [next(stream) for stream in built.streams]
        outputs = {name: t.step(batches[built.stream_of[name]]) for name, t in built.trainers.items()}
        for trainer in built.trainers.values():
            trainer.n_training_steps += 1
        return outputs

    def _stopped(self, built: GroupBuilt, writer: ckpt.CheckpointWriter) -> Outcome:
        writer.submit(self._group_snapshot(built))
        committed = writer.wait()
        saved = f"checkpoint {committed.path.name if committed else '?'} saved"
        if self.uploader is not None and self.uploader.fatal is not None:
            raise CheckpointError(f"{self.uploader.fatal}; {saved}")
        message = f"stopped by {self.stop.signal_name}; {saved}"
        self._close_uploader()
        first = next(iter(built.trainers.values()))
        self._report(first, writer, None, {}, state="interrupted", message=message)
        return Outcome(EXIT_INTERRUPTED, message + "; run the same command to continue")

    def _group_snapshot(self, built: GroupBuilt) -> ckpt.Snapshot:
        return take_group_snapshot(built.trainers, built.streams, self.config_hash, versions())

    def _record_losses(self, outputs: dict[str, Any]) -> dict[str, float]:
        """Each SAE's latest losses into status.json's ``saes``; the first SAE's are returned."""
        assert self.status is not None
        entries = self.status.fields["saes"]
        for entry in entries:
            out = outputs[entry["name"]]
            entry["losses"] = {k: float(v.item() if hasattr(v, "item") else v) for k, v in out.losses.items()}
        return dict(entries[0]["losses"]) if entries else {}


def _needs_estimate(trainer: Any) -> bool:
    mode = trainer.sae.cfg.normalize_activations
    scaler = trainer.activation_scaler
    return (mode == "expected_average_only_in" and scaler.scaling_factor is None) or (
        mode == "covariance_whitening" and scaler.whitening is None
    )
