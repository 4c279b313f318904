"""Base LightningModule for episodic few-shot learners: one evaluation protocol for all."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import hydra.utils
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from metalearn.bilevel import fit_linear_heads, head_logits
from metalearn.bilevel.heads import LearningRate
from metalearn.data.episodes import EpisodeBatch
from metalearn.errors import ConfigError, MetalearnError
from metalearn.models.normalization import (
    BatchStats,
    EpisodeChunk,
    build_backbone,
    check_batch_stats,
    check_episode_chunk,
    embed_episodes,
    episodes_per_call,
    protocol_of,
)
from metalearn.reports import mean_ci95_of_sums, moment_sums
from metalearn.utils.divergence import DIVERGENCE_FACTOR, diverging

__all__ = [
    "EpisodicModule",
    "BatchStats",
    "COMPILE_MODES",
    "EpisodeChunk",
    "Nonfinite",
    "InverseTimeDecay",
    "TrainingDiverged",
]


#: What training does when a meta-batch's loss is inf or NaN (``model.nonfinite``).
Nonfinite = Literal["raise", "skip"]


#: ``model.compile``: ``false`` (eager), ``true`` (torch.compile's default mode) or one of
#: torch.compile's modes; ``reduce-overhead`` (CUDA graphs) needs a CUDA device.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class TrainingDiverged(MetalearnError, FloatingPointError):
    """The training loss became inf or NaN (usually an inner learning rate that is too large)."""


class InverseTimeDecay:
    """Learning-rate factor ``1 / (1 + decay * step)`` (the paper's outer schedule)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def __call__(self, step: int) -> float:
        return 1.0 / (1.0 + self.decay * step)


def model_target(cls: type) -> str:
    """The import path a checkpoint records for a learner: ``metalearn.lightning.<Name>``
    for the package's own (whichever file holds them), else the class's module path."""
    import metalearn.lightning

    if getattr(metalearn.lightning, cls.__qualname__, None) is cls:
        return f"metalearn.lightning.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


#: The outer optimizer when none is given: Adam 1e-3 (the paper's).
DEFAULT_OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}


def check_compile(compile: Any, unsupported: str | None = None) -> str | None:
    """The torch.compile mode of a ``model.compile`` setting (``None``: eager), or
    :class:`ConfigError`; ``unsupported`` says why the learner cannot be compiled."""
    if compile is False or compile is None:
        return None
    mode = "default" if compile is True else compile
    if mode not in COMPILE_MODES:
        raise ConfigError(
            f"model.compile must be true, false or one of {', '.join(COMPILE_MODES)}, "
            f"got {compile!r}"
        )
    if unsupported:
        raise ConfigError(f"model.compile: {unsupported}; set model.compile=false")
    return str(mode)


def query_metrics(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-episode mean cross-entropy and accuracy of (B, Q, N) logits."""
    loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)
    return loss, (logits.argmax(-1) == labels).float().mean(1)


class EpisodicModule(pl.LightningModule):
    """What every episodic learner shares; subclasses define the learner itself.

    A subclass implements :meth:`episode_forward` (per-episode query loss and accuracy,
    optionally the accuracy after each inner step) and :meth:`training_step`, and calls
    :meth:`check_finite` and :meth:`log_train` there. This base class provides the
    backbone, image scaling, the BatchNorm grouping, the outer optimizer with the paper's
    inverse-time decay, and the evaluation protocol: fixed episodes, mean accuracy ± 95%
    CI over all episodes of all ranks, the accuracy after each inner step, the best
    validation accuracy. Checkpoints record the subclass, so evaluate.py and
    :func:`metalearn.load_representation` rebuild the right model.

    Args:
        backbone: Hydra config (``_target_``) of the representation network.
        batch_stats: where BatchNorm takes its statistics, and so the evaluation protocol
            (transductive or inductive), see :data:`~metalearn.models.BatchStats`.
        optimizer: Hydra config of the optimizer, ``_partial_: true`` (params bound here).
        lr_decay: inverse-time decay of the learning rate per step (0: constant).
        nonfinite: when the training loss is inf or NaN: ``"raise"`` stops training with
            a message naming the step; ``"skip"`` skips that meta-batch's update.
        compile: run :meth:`episode_forward` (backbone, inner solve, query loss: what a
            training or evaluation step computes, without logging and the optimizer)
            through ``torch.compile`` with ``fullgraph=True`` and static shapes: ``False``
            (eager), ``True`` (the default mode) or a mode of :data:`COMPILE_MODES`. The
            training and the evaluation graph are compiled once each (their shapes, grad
            mode and ``per_step`` differ), and each compile time is reported once.
            Learners whose step cannot be traced set :attr:`compile_unsupported`.
        episode_chunk: how many episodes of a meta-batch one backbone call embeds:
            ``"auto"`` (one at a time on the CPU, the whole meta-batch on a GPU), an
            integer, or ``None`` (the whole meta-batch), see
            :data:`~metalearn.models.normalization.EpisodeChunk`. The features do not
            depend on it; an integer needs per-episode statistics (``batch_stats``
            episode, split or support).
    """

    #: Why this learner's step cannot be compiled (``None``: it can).
    compile_unsupported: str | None = None
    #: Why this learner cannot train under a mixed ``trainer.precision`` (``None``: it can,
    #: see :meth:`mixed_precision`).
    mixed_precision_unsupported: str | None = None

    def __init__(
        self,
        backbone: Mapping[str, Any],
        batch_stats: BatchStats = "episode",
        optimizer: Mapping[str, Any] | None = None,
        lr_decay: float = 1e-5,
        nonfinite: Nonfinite = "raise",
        compile: bool | str = False,
        episode_chunk: EpisodeChunk = "auto",
    ) -> None:
        super().__init__()
        # Every constructor argument of the subclasses' __init__ chain (Lightning collects
        # them from the frames). They go into checkpoints, which load with weights_only:
        # plain containers only (the model configs set ``_convert_: all``).
        self.save_hyperparameters()
        containers = [k for k, v in self.hparams.items() if isinstance(v, (DictConfig, ListConfig))]
        if containers:
            kind = type(self.hparams[containers[0]]).__name__
            raise ConfigError(
                f"model.{containers[0]} is an OmegaConf {kind}: instantiate the model with "
                f"_convert_: all (as conf/model/*.yaml do) or pass plain dicts and lists"
            )
        if nonfinite not in ("raise", "skip"):
            raise ConfigError(f"model.nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.compile_mode = check_compile(compile, self.compile_unsupported)
        check_batch_stats(batch_stats)
        check_episode_chunk(episode_chunk, batch_stats)
        self.episode_chunk: EpisodeChunk = episode_chunk
        self.backbone: nn.Module = build_backbone(backbone, batch_stats)
        self.batch_stats, self.nonfinite = batch_stats, nonfinite
        self.optimizer_config = dict(optimizer or DEFAULT_OPTIMIZER)
        self.amend_hparams(optimizer=self.optimizer_config)
        self.lr_decay = lr_decay
        self.val_acc_best = 0.0
        self.skipped_batches = 0
        self._skip_update = False
        self._divergence_warned = False
        self._compiled: Callable[..., Any] | None = None
        self._compiled_graphs: set[tuple[Any, ...]] = set()
        #: The autocast dtype of the trainer's mixed precision in the current step (None:
        #: the parameters' precision); set by :meth:`mixed_precision`.
        self._backbone_dtype: torch.dtype | None = None
        self._episode_rows: list[Tensor] = []
        #: The last validation / test result: accuracy, ci95, episodes, loss, and the mean
        #: query accuracy and its CI after t = 0..T inner steps (accuracy_per_step,
        #: ci95_per_step). Set in the process that evaluated (see the pipeline for spawn).
        self.last_eval: dict[str, Any] = {}

    def amend_hparams(self, drop: Sequence[str] = (), **values: Any) -> None:
        """Set ``values`` and remove ``drop`` in the saved hyperparameters, and in the copy
        of them that loggers log (Lightning's ``hparams_initial``)."""
        for key in drop:
            self.hparams.pop(key, None)
        self.hparams.update(values)
        self._hparams_initial = copy.deepcopy(self._hparams)

    # -- to implement -------------------------------------------------------------------
    def episode_logits(
        self, batch: EpisodeBatch, steps: int, per_step: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Query logits of every episode of the meta-batch after ``steps`` inner steps.

        Returns:
            ``(logits (B, NQ, N), accuracy_per_step)``: the second is (B, steps + 1), the
            query accuracy after t = 0..steps inner steps, when ``per_step`` is set, else
            None.
        """
        raise NotImplementedError

    @property
    def eval_steps(self) -> int:
        """Inner steps at validation / test (0 for learners without an inner loop)."""
        return 0

    def divergence_advice(self) -> str:
        """What to change when the training loss explodes (learners with an inner loop
        name its learning rate)."""
        return "lower the outer learning rate (model.optimizer.lr)"

    def diverged_message(self) -> str:
        """What to tell the user when the loss is not finite."""
        return f"{self.divergence_advice()}, or set model.nonfinite=skip"

    # -- shared pieces ------------------------------------------------------------------
    def episode_forward(
        self, batch: EpisodeBatch, steps: int, per_step: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Query loss and accuracy of every episode of the meta-batch.

        Returns:
            ``(loss (B,), accuracy (B,), accuracy_per_step)``: the last as in
            :meth:`episode_logits`.
        """
        if self.compile_mode is None:
            return self._episode_forward(batch, steps, per_step)
        return self._compiled_forward(batch, steps, per_step)

    def _episode_forward(
        self, batch: EpisodeBatch, steps: int, per_step: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        logits, curve = self.episode_logits(batch, steps, per_step)
        loss, accuracy = query_metrics(logits, batch.query_labels)
        return loss, accuracy, curve

    def _compiled_forward(
        self, batch: EpisodeBatch, steps: int, per_step: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`_episode_forward` through ``torch.compile``; reports each graph's compile
        time (its first call) once."""
        if self._compiled is None:
            self._compiled = torch.compile(
                self._episode_forward, fullgraph=True, dynamic=False, mode=self.compile_mode
            )
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        key = (
            torch.is_grad_enabled(),
            self.training,
            steps,
            per_step,
            batch.ways,
            tuple(batch.support.shape),
            tuple(batch.query.shape),
        )
        if key in self._compiled_graphs:
            return self._compiled(batch, steps, per_step)
        start = time.perf_counter()
        out = self._compiled(batch, steps, per_step)
        self._compiled_graphs.add(key)
        what = "training" if torch.is_grad_enabled() else "evaluation"
        rank_zero_info(
            f"torch.compile (mode {self.compile_mode}): first {what} step of "
            f"{len(batch.episode_ids)} episodes, T = {steps}, compile included: "
            f"{time.perf_counter() - start:.1f} s"
        )
        return out

    def linear_head_logits(
        self,
        batch: EpisodeBatch,
        steps: int,
        per_step: bool,
        lr: LearningRate,
        center_features: bool = False,
        detach_features: bool = False,
        **solver: Any,
    ) -> tuple[Tensor, Tensor | None]:
        """Embed the episodes, fit a linear head per episode on its support features by
        ``steps`` steps of :func:`~metalearn.bilevel.fit_linear_heads` (``solver``: its
        other arguments), score the query set.

        ``center_features`` subtracts each episode's mean support feature from its support
        and query features first; ``detach_features`` fits on frozen features.

        Returns:
            ``(logits (B, NQ, N), accuracy_per_step (B, steps + 1) or None)``.
        """
        support_features, query_features = self.embed(batch.support, batch.query)
        if detach_features:
            support_features, query_features = support_features.detach(), query_features.detach()
        if center_features:
            center = support_features.mean(dim=1, keepdim=True)
            support_features, query_features = support_features - center, query_features - center
        curve: list[Tensor] = []

        def track(step: int, weight: Tensor, bias: Tensor) -> None:
            predicted = head_logits(query_features, weight, bias).argmax(-1)
            curve.append((predicted == batch.query_labels).float().mean(1))

        weight, bias = fit_linear_heads(
            support_features,
            batch.support_labels,
            batch.ways,
            steps,
            lr,
            callback=track if per_step else None,
            **solver,
        )
        logits = head_logits(query_features, weight, bias)
        return logits, torch.stack(curve, dim=1) if per_step else None

    @property
    def protocol(self) -> str:
        """``"transductive"`` or ``"inductive"``: what ``batch_stats`` makes the evaluation."""
        return protocol_of(self.batch_stats)

    def embed(self, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone features of support (B, NK, ...) and query (B, NQ, ...) images.

        uint8 images are scaled to [0, 1] here, on the model's device and in the
        parameters' dtype, one meta-batch at a time; BatchNorm statistics as
        ``batch_stats`` says (:func:`~metalearn.models.embed_episodes`), ``episode_chunk``
        episodes per backbone call. Returns
        (B, NK, d) and (B, NQ, d).
        """
        support, query = self._to_float(support), self._to_float(query)
        with self.backbone_precision():
            support_features, query_features = embed_episodes(
                self.backbone,
                support,
                query,
                self.batch_stats,
                episodes_per_call(self.episode_chunk, self.batch_stats, support.device),
            )
        dtype = self._param_dtype
        return support_features.to(dtype), query_features.to(dtype)

    @contextlib.contextmanager
    def mixed_precision(self) -> Iterator[None]:
        """Mixed precision for the backbone only: inside, autocast is off and the trainer's
        autocast dtype (``trainer.precision=bf16-mixed`` or ``16-mixed``), if any, is kept
        for :meth:`backbone_precision`.

        The backbone's convolutions are where lower precision pays; the inner problem (the
        per-episode head fit and its T steps), the query loss and the hypergradient through
        them stay in the parameters' precision (float32), like the losses and reductions
        that autocast itself keeps in float32. Training and evaluation steps run inside.
        """
        device = self.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        outer, self._backbone_dtype = self._backbone_dtype, dtype
        try:
            with torch.autocast(device, enabled=False):
                yield
        finally:
            self._backbone_dtype = outer

    def backbone_precision(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast in the trainer's mixed-precision dtype around a backbone call (see
        :meth:`mixed_precision`); a no-op at full precision."""
        if self._backbone_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._backbone_dtype)

    def _to_float(self, images: Tensor) -> Tensor:
        """uint8 (0..255) -> the parameters' floating dtype in [0, 1]."""
        if images.dtype != torch.uint8:
            return images
        return images.to(self._param_dtype).div_(255)

    @property
    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def check_finite(self, loss: Tensor, batch: EpisodeBatch) -> bool:
        """Whether this meta-batch updates the model: False when the loss is inf or NaN on
        any rank (then every rank skips the update, keeping the ranks in step), or
        :class:`TrainingDiverged` on every rank with ``nonfinite="raise"``.

        A skipped meta-batch still counts as a step (the episode stream and the global step
        stay together, so a resume neither replays nor drops a meta-batch); the learner
        returns its loss as usual so that every rank runs the backward pass its gradient
        all-reduce waits for, and :meth:`on_before_optimizer_step` drops the gradients.
        """
        bad = torch.tensor(0.0 if bool(torch.isfinite(loss)) else 1.0, device=loss.device)
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if not bad.item():
            self._check_divergence(float(loss.detach()), batch.ways)
            return True
        where = (
            f"{loss.detach().item()}" if not torch.isfinite(loss) else "not finite on another rank"
        )
        message = f"the training loss is {where} at step {self.global_step}: " + (
            self.diverged_message()
        )
        if self.nonfinite == "raise":
            raise TrainingDiverged(message)
        rank_zero_warn(message + "; skipping this meta-batch")
        self.skipped_batches += 1
        self._skip_update = True
        self.log("train/skipped", float(self.skipped_batches), batch_size=len(batch.episode_ids))
        return False

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gradients of a skipped meta-batch, so the optimizer leaves the
        parameters and its state as they are (a gradient scaler skips on its own)."""
        if not self._skip_update:
            return
        self._skip_update = False
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # mixed precision: the scaler sees the inf / NaN gradients and skips
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None

    def _check_divergence(self, loss: float, ways: int) -> None:
        """Warn once when a finite training loss is far above chance level, log(ways)."""
        chance = math.log(ways)
        if self._divergence_warned or not diverging(chance, loss):
            return
        self._divergence_warned = True
        rank_zero_warn(
            f"the training loss {loss:.4g} at step {self.global_step} is more than "
            f"{DIVERGENCE_FACTOR:g}x the loss of chance-level predictions (log {ways} = "
            f"{chance:.3g}): training is diverging; {self.divergence_advice()}"
        )

    #: T of a training step (0: a learner without an inner loop).
    inner_steps: int = 0

    def training_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Per-episode training loss and query accuracy of a meta-batch, (B,) each."""
        loss, accuracy, _ = self.episode_forward(batch, self.inner_steps)
        return loss, accuracy

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor:
        with self.mixed_precision():
            loss, accuracy = self.training_loss(batch)
        loss = loss.mean()
        if not self.check_finite(loss, batch):
            return loss  # every rank runs backward; the update is skipped
        self.log_train(loss, accuracy)
        return loss

    def log_train(self, loss: Tensor, accuracy: Tensor) -> None:
        """Log ``train/loss``, ``train/acc`` (progress bar) and the optimizer's rate."""
        size = len(accuracy)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/acc", accuracy.mean(), prog_bar=True, batch_size=size)
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if optimizer is not None:
            self.log("train/outer_lr", float(optimizer.param_groups[0]["lr"]), batch_size=size)

    def setup(self, stage: str) -> None:
        """Check that ``model.compile=reduce-overhead`` (CUDA graphs) runs on a CUDA device
        and that a mixed ``trainer.precision`` is one this learner supports."""
        if self._trainer is None:
            return
        precision = str(self.trainer.precision)
        if precision.endswith("-mixed") and self.mixed_precision_unsupported:
            raise ConfigError(
                f"trainer.precision={precision}: {self.mixed_precision_unsupported}; "
                f"use trainer.precision=32-true"
            )
        if self.compile_mode != "reduce-overhead":
            return
        device = self.trainer.strategy.root_device
        if device.type != "cuda":
            raise ConfigError(
                f"model.compile=reduce-overhead uses CUDA graphs and needs a CUDA device; "
                f"this run is on {device.type}: use model.compile=true"
            )

    def configure_optimizers(self) -> Any:
        return self.optimizer_and_schedule([p for p in self.parameters() if p.requires_grad])

    def optimizer_and_schedule(self, params: Any) -> Any:
        """The outer optimizer over ``params`` (tensors or parameter groups) with the
        inverse-time decay of its learning rate per step."""
        optimizer = hydra.utils.instantiate(self.optimizer_config)(params=params)
        if not self.lr_decay:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, InverseTimeDecay(self.lr_decay))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- evaluation: no outer graph ----------------------------------------------------
    def _eval_step(self, batch: EpisodeBatch) -> None:
        with torch.no_grad(), self.mixed_precision():
            loss, _, curve = self.episode_forward(batch, self.eval_steps, per_step=True)
        assert curve is not None
        # Row layout: accuracy after t = 0..T steps, then the query loss. A rank's padding
        # episode (id -1, see FixedEpisodes) counts nowhere.
        real = (batch.episode_ids >= 0).to(loss.device)
        self._episode_rows.append(torch.cat([curve, loss[:, None]], dim=1)[real])

    def _eval_epoch_end(self, stage: str) -> dict[str, Any]:
        # The count, sum and sum of squares of every column over this rank's episodes,
        # summed over the ranks (evaluation episodes are split without repeats).
        sums = moment_sums(torch.cat(self._episode_rows))
        self._episode_rows.clear()
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        means, ci95s = mean_ci95_of_sums(sums)
        stats = list(zip(means[:-1].tolist(), ci95s[:-1].tolist(), strict=True))
        mean, ci95 = stats[-1]
        result: dict[str, Any] = {
            "accuracy": mean,
            "ci95": ci95,
            "episodes": int(sums[0, 0]),
            "loss": float(means[-1]),
            "accuracy_per_step": [m for m, _ in stats],
            "ci95_per_step": [c for _, c in stats],
        }
        self.log(f"{stage}/acc", mean, prog_bar=stage == "val", sync_dist=False)
        self.log(f"{stage}/ci95", ci95, sync_dist=False)
        self.log(f"{stage}/loss", result["loss"], sync_dist=False)
        if stage == "test":
            # Also in callback_metrics, which reach the main process under ddp_spawn.
            self.log("test/episodes", float(result["episodes"]), logger=False, sync_dist=False)
            for t, (m, c) in enumerate(stats):
                self.log(f"test/acc_t{t}", m, logger=False, sync_dist=False)
                self.log(f"test/ci95_t{t}", c, logger=False, sync_dist=False)
        self.last_eval = result
        return result

    def validation_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._episode_rows.clear()
            return
        result = self._eval_epoch_end("val")
        self.val_acc_best = max(self.val_acc_best, result["accuracy"])
        self.log("val/acc_best", self.val_acc_best, sync_dist=False)

    def test_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["val_acc_best"] = self.val_acc_best
        checkpoint["skipped_batches"] = self.skipped_batches
        checkpoint["model_target"] = model_target(type(self))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_acc_best = float(checkpoint.get("val_acc_best", 0.0))
        self.skipped_batches = int(checkpoint.get("skipped_batches", 0))
