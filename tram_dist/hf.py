"""TRAM inside the HF transformers Trainer: TRAMTrainer and TRAMTrainingArguments.

    args = TRAMTrainingArguments(output_dir="out", gradient_accumulation_steps=2,
                                 tram_target="noised_input", tram_scale=100.0, tram_rho_max=1.0)
    TRAMTrainer(model=model, args=args, train_dataset=train).train()

The Trainer keeps everything it owns: the model wrapping it sets up (DDP, FSDP, the DeepSpeed
engine from ``--deepspeed ds_config.json``), its data loading and accumulation windows,
clipping (``max_grad_norm``), the learning-rate schedule, logging and checkpoints. Only the
optimizer step changes: the Trainer hands ``training_step`` one micro-batch at a time; TRAMTrainer
keeps the micro-batches of a window and, at the window's last one, runs the whole TRAM step over
them (pass 1 on each, one all-reduce, the ascent, pass 2 on each, theta restored). The Trainer
then clips and applies g' as it would its own gradient. Under DeepSpeed the engine's step is
TRAM's to take (engine.step() after pass 2); the Trainer's optimizer and scheduler calls are
no-ops there already, and the config's gradient_clipping (HF "auto": max_grad_norm) clips.

A causal LM's token loss (HF's, which takes num_items_in_batch) and a compute_loss_func weigh a
window's micro-batches by their loss tokens, as the Trainer's own step does: each micro-batch's
loss is its token sum over the window's token count (all ranks'), in pass 1 and pass 2; the
divergence is a mean over all counted positions of the window already. Other models' losses are
each micro-batch's mean and weigh equally. (The Trainer's own step also passes the count to
models whose loss ignores it, such as BertForSequenceClassification, and then sums the
micro-batch means times the world size; TRAM steps do not copy that.)
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections import defaultdict
from typing import Any, Optional

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .checkpoint import STATE_FILE, atomic_save, read_state
from .config import TRAMConfig
from .forward import IGNORE_INDEX, next_token_mask, returns_model_logits
from .optimizer import TRAM

# Metrics a TRAM step reports that go into the Trainer's logs, averaged over the logging window.
LOGGED = ("d", "kl", "grad_norm", "e_norm", "loss_perturbed", "skipped", "kl_scale")


# Every TRAMConfig setting but max_grad_norm: the Trainer's own max_grad_norm clips g'.
_FIELDS = [f for f in dataclasses.fields(TRAMConfig) if f.name != "max_grad_norm"]


def with_tram_fields(base: type, name: str, module: str = __name__) -> type:
    """``base`` (TrainingArguments or a subclass) plus one ``tram_<name>`` field per TRAMConfig
    setting and ``tram`` on/off, so that HfArgumentParser gives ``--tram_target previous``."""
    cls = dataclasses.make_dataclass(name, list(_tram_fields()), bases=(base,), namespace={
        "tram_config": _tram_config, "__doc__": f"{base.__name__} with TRAM's settings as tram_* fields."})
    cls.__module__ = module  # the Trainer pickles its arguments into checkpoints
    return cls


def _tram_fields():
    hints = typing.get_type_hints(TRAMConfig)
    yield "tram", bool, dataclasses.field(default=True, metadata={
        "help": "Take TRAM steps; False trains with the Trainer's own step (the base-optimizer baseline)."})
    notes = {"target": "; 'none' for None", "scale": "; a number or 'auto'"}
    for f in _FIELDS:
        kind = str if f.name == "scale" else hints[f.name]  # the command line's parser takes no Union
        yield f"tram_{f.name}", kind, dataclasses.field(default=f.default, metadata={
            "help": f"TRAMConfig.{f.name} (docs/settings.md)" + notes.get(f.name, "")})


def _tram_config(self) -> TRAMConfig:
    """The TRAMConfig these arguments describe (validated: a bad value names its setting)."""
    values = {f.name: getattr(self, f"tram_{f.name}") for f in _FIELDS}
    if isinstance(values["target"], str) and values["target"].lower() == "none":
        values["target"] = None
    if isinstance(values["scale"], str) and values["scale"] != "auto":  # "100" from the command line
        try:
            values["scale"] = float(values["scale"])
        except ValueError:
            pass  # TRAMConfig names it
    return TRAMConfig(**values)


TRAMTrainingArguments = with_tram_fields(TrainingArguments, "TRAMTrainingArguments")


class TRAMTrainer(Trainer):
    """A Trainer whose optimizer step is a TRAM step (module docstring).

    ``tram_config`` overrides the arguments' tram_* fields; ``tram_forward(model, inputs)`` may
    return (loss, logits[, mask]) for models whose outputs carry no ``logits``.
    """

    def __init__(self, *args, tram_config: Optional[TRAMConfig] = None, tram_forward=None, **kwargs):
        super().__init__(*args, **kwargs)
        hf_args = self.args
        self.use_tram = getattr(hf_args, "tram", True)
        if tram_config is None:
            tram_config = hf_args.tram_config() if hasattr(hf_args, "tram_config") else TRAMConfig()
        tram_config.validate()
        if tram_config.max_grad_norm is not None:
            raise ValueError("TRAMConfig.max_grad_norm: under the Trainer set max_grad_norm in the training "
                             "arguments (the Trainer clips the descent gradient itself)")
        if self.use_tram and hf_args.fp16 and not self.is_deepspeed_enabled:
            raise ValueError("fp16=True: TRAMTrainer supports fp16 only under DeepSpeed (the engine scales the "
                             "loss); use bf16=True, or a DeepSpeed config with fp16")
        self.tram_config = tram_config
        self.tram_forward = tram_forward
        self.tram: Optional[TRAM] = None
        self._window: list[dict[str, Any]] = []
        self._tram_logs: dict[str, list[float]] = defaultdict(list)
        self._tram_resume: Optional[str] = None
        self._num_items, self._window_size = None, 1
        # The Trainer's own reading of the model: its loss is the causal-LM token loss (labels shifted).
        self._shifts_labels = bool(getattr(self, "_loss_shifts_labels", False))

    # -- the step ----------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.use_tram:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        self._window.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:  # not the window's last micro-batch: keep it
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []
        tram = self._tram_for(model)
        # Token weighting where the loss divides by the window's count: a causal LM's token loss
        # (it takes num_items_in_batch), or a compute_loss_func (given it, as by the Trainer).
        weighs = self._shifts_labels or self.compute_loss_func is not None
        self._num_items = num_items_in_batch if weighs else None
        self._window_size = len(window)
        # DeepSpeed: TRAM takes engine.step(); elsewhere the Trainer clips and steps after this.
        metrics = tram.step(window, update=not tram.backend.caller_may_update)
        for key in LOGGED:  # kept as they come (some are device tensors): read when logged
            if key in metrics:
                self._tram_logs[key].append(metrics[key])
        loss = metrics.get("loss", metrics.get("loss_local", math.nan))
        # The Trainer sums what each micro-batch returns: the window's mean loss, returned once.
        # torch.full, not torch.tensor: on a GPU the latter copies from the host and waits for the stream.
        return loss.detach().float() if torch.is_tensor(loss) else torch.full((), loss, device=self.args.device)

    def _tram_for(self, model) -> TRAM:
        """TRAM over the model as the Trainer wrapped it, made at the first step (after any resume)."""
        if self.tram is None:
            optimizer = None if self.is_deepspeed_enabled else getattr(self.optimizer, "optimizer", self.optimizer)
            forward = self.tram_forward if self.tram_forward is not None else self._forward
            self.tram = TRAM(model, optimizer, self.tram_config, forward_fn=forward)
            if self._tram_resume is not None:
                self.tram.load_state_dict(read_state(self._state_path(self._tram_resume)))
        return self.tram

    @returns_model_logits
    def _forward(self, module, inputs):
        """(loss, logits, mask) through the Trainer's own compute_loss (label smoothing, custom losses)."""
        with self.compute_loss_context_manager():
            loss, outputs = self._compute_loss(module, inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        return (self._window_loss(loss), *_predictions(logits, inputs, self._shifts_labels))

    def _compute_loss(self, module, inputs):
        """(loss, outputs) of one micro-batch, with the window's token count where the Trainer weighs by it."""
        return self.compute_loss(module, inputs, return_outputs=True, num_items_in_batch=self._num_items)

    def _window_loss(self, loss):
        """TRAM scales each micro-batch's loss by 1/n; a loss already over the window's token count
        (token sum / N) is multiplied back by n, so that the step's gradient is the Trainer's."""
        return loss * self._window_size if self._num_items is not None else loss

    # -- logs and checkpoints ----------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._tram_logs and "loss" in logs:  # a training log: add TRAM's means since the last one
            for key, values in self._tram_logs.items():
                finite = [v for v in map(float, values) if math.isfinite(v)]
                if finite:
                    logs[f"tram/{key}"] = sum(finite) / len(finite)
            self._tram_logs.clear()
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True: no checkpoint in output_dir {self.args.output_dir!r}")
        if isinstance(resume_from_checkpoint, str) and self.use_tram:
            path = self._state_path(resume_from_checkpoint)
            if not os.path.isfile(path):  # before the Trainer loads anything, on every rank
                raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r} has no TRAM state {path!r}: "
                                 "it was not written by TRAMTrainer with TRAM on")
            self._tram_resume = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        # TRAM's state goes in first: a checkpoint the Trainer considers complete always has it.
        if self.tram is not None:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            atomic_save(self.tram.state_dict(), self._state_path(folder))
        return super()._save_checkpoint(model, trial)

    def _state_path(self, folder: str) -> str:
        return os.path.join(folder, STATE_FILE.format(rank=self.args.process_index))


def _predictions(logits: torch.Tensor, inputs: dict, shifts_labels: bool):
    """The logits that count in the divergence, and their mask: a causal LM's position t predicts
    token t+1 (the logits stay whole, the last position masked out); token-level labels count
    where not ignored; a sequence label counts once."""
    labels, attention = inputs.get("labels"), inputs.get("attention_mask")
    if shifts_labels and labels is not None:
        attention = attention if attention is not None and attention.shape == labels.shape else None
        return logits, next_token_mask(labels, attention)
    if labels is None or labels.shape != logits.shape[:-1]:
        return logits, None
    mask = labels != IGNORE_INDEX
    if attention is not None and attention.shape == mask.shape:  # token-level labels only
        mask = mask & attention.bool()
    return logits, mask
