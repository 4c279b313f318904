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
from torch import Tensor, nn

from metalearn.bilevel import fit_linear_heads, head_logits
from metalearn.data.episodes import EpisodeBatch
from metalearn.errors import ConfigError

__all__ = ["HyperRepresentation", "InverseTimeDecay", "BatchStats"]

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


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and 95% confidence half-width ``1.96 * std / sqrt(n)`` of per-episode values."""
    values = values.double()
    std = values.std(unbiased=True).item() if values.numel() > 1 else 0.0
    return values.mean().item(), 1.96 * std / math.sqrt(values.numel())


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
        self.val_acc_best = 0.0
        self._episode_acc: list[Tensor] = []
        self._episode_loss: list[Tensor] = []
        self.last_eval: dict[str, float] = {}

    # -- the model ----------------------------------------------------------------------
    @property
    def inner_lr(self) -> Tensor:
        """The inner learning rate η as a positive 0-d tensor (differentiable)."""
        if self.inner_lr_param == "exp":
            return self.inner_lr_raw.exp()
        return F.softplus(self.inner_lr_raw)

    def embed(self, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone features of support (B, NK, ...) and query (B, NQ, ...) images.

        uint8 images are scaled to [0, 1] here, on the model's device, one meta-batch at a
        time. Returns (B, NK, d) and (B, NQ, d).
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

    @staticmethod
    def _to_float(images: Tensor) -> Tensor:
        return images.float().div_(255) if images.dtype == torch.uint8 else images

    def episode_forward(self, batch: EpisodeBatch, steps: int) -> tuple[Tensor, Tensor]:
        """Query loss and accuracy of every episode of the meta-batch, each of shape (B,)."""
        support_features, query_features = self.embed(batch.support, batch.query)
        weight, bias = fit_linear_heads(
            support_features,
            batch.support_labels,
            batch.ways,
            steps,
            self.inner_lr,
            l2=self.l2,
            truncate=self.truncate,
            first_order=self.first_order,
        )
        logits = head_logits(query_features, weight, bias)
        loss = F.cross_entropy(logits.transpose(1, 2), batch.query_labels, reduction="none")
        accuracy = (logits.argmax(-1) == batch.query_labels).float().mean(1)
        return loss.mean(1), accuracy

    # -- training -----------------------------------------------------------------------
    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor:
        loss, accuracy = self.episode_forward(batch, self.inner_steps)
        loss = loss.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the outer loss is {loss.item()} at step {self.global_step} (inner lr "
                f"{self.inner_lr.item():.4g}); lower model.inner_lr or the outer learning rate"
            )
        size = len(accuracy)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/acc", accuracy.mean(), prog_bar=True, batch_size=size)
        self.log("train/inner_lr", self.inner_lr.detach(), batch_size=size)
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
            loss, accuracy = self.episode_forward(batch, self.eval_steps)
        self._episode_loss.append(loss)
        self._episode_acc.append(accuracy)

    def _gather(self, values: list[Tensor]) -> Tensor:
        """Per-episode values of all ranks, as one flat tensor."""
        gathered = self.all_gather(torch.cat(values))
        assert isinstance(gathered, Tensor)
        return gathered.flatten()

    def _eval_epoch_end(self, stage: str) -> dict[str, float]:
        accuracy = self._gather(self._episode_acc)
        loss = self._gather(self._episode_loss)
        self._episode_acc.clear()
        self._episode_loss.clear()
        mean, ci95 = mean_ci95(accuracy)
        result = {"accuracy": mean, "ci95": ci95, "episodes": int(accuracy.numel())}
        self.log(f"{stage}/acc", mean, prog_bar=stage == "val", sync_dist=False)
        self.log(f"{stage}/ci95", ci95, sync_dist=False)
        self.log(f"{stage}/loss", loss.double().mean().item(), sync_dist=False)
        self.last_eval = result
        return result

    def validation_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._episode_acc.clear()
            self._episode_loss.clear()
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
