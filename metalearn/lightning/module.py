"""LightningModule of the hyper-representation model (Franceschi et al. 2018, Sec. 3.2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import hydra.utils
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from metalearn.bilevel import fit_linear_heads, head_logits
from metalearn.data.episodes import EpisodeBatch
from metalearn.errors import ConfigError, MetalearnError
from metalearn.reports import mean_ci95

__all__ = ["HyperRepresentation", "InverseTimeDecay", "BatchStats", "TrainingDiverged"]


class TrainingDiverged(MetalearnError, FloatingPointError):
    """The outer loss became inf or NaN (usually an inner learning rate that is too large)."""


#: How BatchNorm statistics are grouped in the backbone pass (``norm="batch"`` backbones):
#: ``"episode"``: per episode over its support and query images together (one pass);
#: ``"split"``: per episode, support and query separately (two passes; the paper's code);
#: ``"meta_batch"``: over all images of the meta-batch at once (one pass).
BatchStats = Literal["episode", "split", "meta_batch"]


class InverseTimeDecay:
    """Learning-rate factor ``1 / (1 + decay * step)`` (the paper's outer schedule)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def __call__(self, step: int) -> float:
        return 1.0 / (1.0 + self.decay * step)


def _plain(config: Any) -> Any:
    return (
        OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config
    )


class HyperRepresentation(pl.LightningModule):
    """Bilevel meta-learning of a representation with per-episode linear heads.

    Outer variables: the backbone h_λ and, optionally, the inner learning rate η.
    Inner variables: one linear softmax head per episode, started at zero and trained by
    ``inner_steps`` steps of gradient descent on the support set
    (:func:`metalearn.bilevel.fit_linear_heads`). Outer objective: mean query
    cross-entropy over the meta-batch; its ``.backward()`` is the exact reverse-mode
    hypergradient of the T-step problem.

    Args:
        backbone: Hydra config (``_target_``) of the representation network.
        inner_steps: T in training.
        eval_inner_steps: T for validation and test (``None``: same as ``inner_steps``).
        inner_lr: initial inner learning rate η (> 0).
        learn_inner_lr: make η an outer variable (kept positive, see ``inner_lr_param``).
        inner_lr_param: ``"exp"`` (η = exp(ρ)) or ``"softplus"`` (η = log(1 + exp(ρ))).
        l2: L2 penalty of the inner problem on the head weights.
        truncate: backpropagate through the last ``truncate`` inner steps only.
        first_order: drop second-order terms of the hypergradient.
        batch_stats: grouping of BatchNorm statistics, see :data:`BatchStats`.
        optimizer: Hydra config of the outer optimizer, ``_partial_: true`` (params bound here).
        lr_decay: inverse-time decay of the outer learning rate per step (0: constant).
        nonfinite: what to do when the outer loss is inf or NaN (a diverging inner loop):
            ``"raise"`` stops training with a message naming the step and the inner lr;
            ``"skip"`` skips that meta-batch's update (never trains on NaN).
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        inner_lr: float = 0.1,
        learn_inner_lr: bool = True,
        inner_lr_param: str = "exp",
        l2: float = 0.0,
        truncate: int | None = None,
        first_order: bool = False,
        batch_stats: BatchStats = "episode",
        optimizer: Mapping[str, Any] | None = None,
        lr_decay: float = 1e-5,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__()
        backbone, optimizer = _plain(backbone), _plain(optimizer)
        if optimizer is None:
            optimizer = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "inner_steps": inner_steps,
                "eval_inner_steps": eval_inner_steps,
                "inner_lr": inner_lr,
                "learn_inner_lr": learn_inner_lr,
                "inner_lr_param": inner_lr_param,
                "l2": l2,
                "truncate": truncate,
                "first_order": first_order,
                "batch_stats": batch_stats,
                "optimizer": optimizer,
                "lr_decay": lr_decay,
                "nonfinite": nonfinite,
            }
        )
        if inner_steps < 1 or (eval_inner_steps is not None and eval_inner_steps < 1):
            raise ConfigError(
                f"model.inner_steps and model.eval_inner_steps must be >= 1, got "
                f"{inner_steps} and {eval_inner_steps}"
            )
        if not inner_lr > 0:
            raise ConfigError(f"model.inner_lr must be > 0, got {inner_lr}")
        if inner_lr_param not in ("exp", "softplus"):
            raise ConfigError(
                f"model.inner_lr_param must be 'exp' or 'softplus', got {inner_lr_param!r}"
            )
        if nonfinite not in ("raise", "skip"):
            raise ConfigError(f"model.nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if batch_stats not in ("episode", "split", "meta_batch"):
            raise ConfigError(
                f"model.batch_stats must be one of episode, split, meta_batch, got {batch_stats!r}"
            )
        self.backbone: nn.Module = hydra.utils.instantiate(backbone)
        self.inner_steps, self.eval_inner_steps = inner_steps, eval_inner_steps
        self.inner_lr_param, self.l2, self.truncate = inner_lr_param, l2, truncate
        self.first_order, self.batch_stats = first_order, batch_stats
        self.optimizer_config, self.lr_decay = optimizer, lr_decay
        raw = math.log(inner_lr) if inner_lr_param == "exp" else math.log(math.expm1(inner_lr))
        self.inner_lr_raw = nn.Parameter(torch.tensor(raw), requires_grad=learn_inner_lr)
        self.nonfinite = nonfinite
        self.val_acc_best = 0.0
        self.skipped_batches = 0
        self._episode_rows: list[Tensor] = []
        self._episode_ids: list[Tensor] = []
        #: The last validation / test result: accuracy, ci95, episodes, loss, and the mean
        #: query accuracy and its CI after t = 0..T inner steps (accuracy_per_step,
        #: ci95_per_step). Set in the process that evaluated (see the pipeline for spawn).
        self.last_eval: dict[str, Any] = {}

    # -- the model ----------------------------------------------------------------------
    @property
    def inner_lr(self) -> Tensor:
        """The inner learning rate η as a positive 0-d tensor (differentiable)."""
        if self.inner_lr_param == "exp":
            return self.inner_lr_raw.exp()
        return F.softplus(self.inner_lr_raw)

    def embed(self, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone features of support (B, NK, ...) and query (B, NQ, ...) images.

        uint8 images are scaled to [0, 1] here, on the model's device and in the
        parameters' dtype, one meta-batch at a time. Returns (B, NK, d) and (B, NQ, d).
        """
        support, query = self._to_float(support), self._to_float(query)
        stats = self.batch_stats
        if stats == "split":
            return self.backbone(support), self.backbone(query)
        images = torch.cat([support, query], dim=1)
        if stats == "meta_batch":
            features = self.backbone(images.flatten(0, 1)).unflatten(0, images.shape[:2])
        else:
            features = self.backbone(images)
        return features.split([support.shape[1], query.shape[1]], dim=1)

    def _to_float(self, images: Tensor) -> Tensor:
        """uint8 (0..255) -> the parameters' floating dtype in [0, 1]."""
        if images.dtype != torch.uint8:
            return images
        return images.to(self.inner_lr_raw.dtype).div_(255)

    def episode_forward(
        self, batch: EpisodeBatch, steps: int, per_step: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Query loss and accuracy of every episode of the meta-batch.

        Returns:
            ``(loss (B,), accuracy (B,), accuracy_per_step)``: the last is (B, steps + 1),
            the query accuracy of the heads after t = 0..steps inner steps, when
            ``per_step`` is set, else None.
        """
        support_features, query_features = self.embed(batch.support, batch.query)
        curve: list[Tensor] = []

        def track(step: int, weight: Tensor, bias: Tensor) -> None:
            predicted = head_logits(query_features, weight, bias).argmax(-1)
            curve.append((predicted == batch.query_labels).float().mean(1))

        weight, bias = fit_linear_heads(
            support_features,
            batch.support_labels,
            batch.ways,
            steps,
            self.inner_lr,
            l2=self.l2,
            truncate=self.truncate,
            first_order=self.first_order,
            callback=track if per_step else None,
        )
        logits = head_logits(query_features, weight, bias)
        loss = F.cross_entropy(logits.transpose(1, 2), batch.query_labels, reduction="none")
        accuracy = (logits.argmax(-1) == batch.query_labels).float().mean(1)
        return loss.mean(1), accuracy, torch.stack(curve, dim=1) if per_step else None

    # -- training -----------------------------------------------------------------------
    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor | None:
        loss, accuracy, _ = self.episode_forward(batch, self.inner_steps)
        loss = loss.mean()
        if not torch.isfinite(loss):
            message = (
                f"the outer loss is {loss.item()} at step {self.global_step} with inner lr "
                f"{self.inner_lr.item():.4g}: the inner loop diverged; lower model.inner_lr "
                f"(or the outer learning rate), or set model.nonfinite=skip"
            )
            if self.nonfinite == "raise":
                raise TrainingDiverged(message)
            rank_zero_warn(message + "; skipping this meta-batch")
            self.skipped_batches += 1
            self.log("train/skipped", float(self.skipped_batches), batch_size=len(accuracy))
            return None
        size = len(accuracy)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/acc", accuracy.mean(), prog_bar=True, batch_size=size)
        self.log("train/inner_lr", self.inner_lr.detach(), batch_size=size)
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if optimizer is not None:
            self.log("train/outer_lr", float(optimizer.param_groups[0]["lr"]), batch_size=size)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = hydra.utils.instantiate(self.optimizer_config)(params=params)
        if not self.lr_decay:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, InverseTimeDecay(self.lr_decay))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- evaluation: the inner solve needs no outer graph --------------------------------
    @property
    def eval_steps(self) -> int:
        return self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps

    def _eval_step(self, batch: EpisodeBatch) -> None:
        with torch.no_grad():
            loss, _, curve = self.episode_forward(batch, self.eval_steps, per_step=True)
        assert curve is not None
        # Row layout: accuracy after t = 0..T steps, then the query loss.
        self._episode_rows.append(torch.cat([curve, loss[:, None]], dim=1))
        self._episode_ids.append(batch.episode_ids.to(loss.device))

    def _gather_episodes(self) -> tuple[Tensor, Tensor]:
        """Per-episode rows of all ranks, each episode once, ordered by episode id.

        Ranks may hold different numbers of episodes (evaluation episodes are split
        without padding), so rows are padded to a common length for ``all_gather`` and
        the padding (id -1) dropped afterwards.
        """
        rows, ids = torch.cat(self._episode_rows), torch.cat(self._episode_ids)
        self._episode_rows.clear()
        self._episode_ids.clear()
        if self.trainer.world_size > 1:
            count = torch.tensor([len(ids)], device=ids.device)
            longest = int(self.trainer.strategy.reduce(count, reduce_op="max").item())
            pad = longest - len(ids)
            rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
            ids = torch.cat([ids, ids.new_full((pad,), -1)])
            rows = self.all_gather(rows).flatten(0, -2)  # type: ignore[union-attr]
            ids = self.all_gather(ids).flatten()  # type: ignore[union-attr]
        keep = ids >= 0
        rows, ids = rows[keep], ids[keep]
        order = torch.argsort(ids)
        return rows[order], ids[order]

    def _eval_epoch_end(self, stage: str) -> dict[str, Any]:
        rows, _ = self._gather_episodes()
        curve, loss = rows[:, :-1], rows[:, -1]
        stats = [mean_ci95(curve[:, t]) for t in range(curve.shape[1])]
        mean, ci95 = stats[-1]
        result: dict[str, Any] = {
            "accuracy": mean,
            "ci95": ci95,
            "episodes": int(curve.shape[0]),
            "loss": float(loss.double().mean()),
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
            self._episode_ids.clear()
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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_acc_best = float(checkpoint.get("val_acc_best", 0.0))
