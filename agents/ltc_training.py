"""Learning to Cascade as a run-harness algorithm: one model after another, then thresholds.

Enomoto & Eda 2021. Separate models are trained from the most expensive down
(eq. 5): the last with cross-entropy, each cheaper one with the LtC loss against the
already trained next model. A multi-exit network trains all exits at once (eq. 6).
Each model (a *part*) gets ``ltc.epochs`` epochs, its own optimiser and schedule,
and batches drawn from ``seed + stage``. After the last epoch the max-softmax
thresholds are fitted on validation: the cheapest whose accuracy is at least
(1 - epsilon) x the last classifier's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from policycascade.agents.algorithm import Algorithm, generator_state, load_optimizers
from policycascade.agents.ltc import MultiExitNet, ltc_loss, multi_exit_ltc_loss
from policycascade.agents.thresholds import ThresholdRule, ThresholdSearch
from policycascade.optimizers import build_optimizer

if TYPE_CHECKING:
    from policycascade.harness import RunHarness


class LtcTraining(Algorithm):
    """LtC's sequential (or multi-exit) training; ends with validation-fitted thresholds."""

    name = "ltc"

    def __init__(self, harness: RunHarness, train: bool = True):
        super().__init__(harness, train)
        self.settings = harness.config.ltc
        self.net: MultiExitNet | None = None
        if self.settings.form == "multi-exit":
            data = harness.data
            self.net = MultiExitNet(data.num_classes, in_channels=data.input_shape[0])
            self.cascade = self.net.as_cascade().to(harness.device)
        else:
            self.cascade = harness.build_cascade()
        self.thresholds: list[float] | None = None
        self._part: int | None = None  # the part whose optimiser below is live
        self._saved_part: dict[str, Any] | None = None  # a checkpoint's part state, not yet used
        self.optimizer = self.schedule = self.generator = None
        self._expensive_correct: torch.Tensor | None = None

    @property
    def num_parts(self) -> int:
        """Models trained one after another (1 for the multi-exit network)."""
        return 1 if self.net is not None else self.cascade.num_stages

    @property
    def num_epochs(self) -> int:
        """Epochs of every part together."""
        return self.num_parts * self.settings.epochs

    @property
    def classifier_epochs(self) -> int:
        """Each model trains for ``ltc.epochs`` epochs."""
        return self.settings.epochs

    def stage_of_part(self, part: int) -> int:
        """The stage trained in ``part``: the most expensive first (eq. 5)."""
        return self.cascade.num_stages - 1 - part

    def rule(self) -> ThresholdRule | None:
        """The fitted max-softmax thresholds (None until training has finished)."""
        if self.thresholds is None:
            return None
        return ThresholdRule("max-softmax", self.thresholds, name="ltc")

    def modules(self) -> list[tuple[str, nn.Module]]:
        """Each classifier by stage and name."""
        return [
            (f"classifier stage {t} ({name!r})", classifier)
            for t, (name, classifier) in enumerate(
                zip(self.cascade.names, self.cascade.classifiers, strict=True)
            )
        ]

    def final_extras(self) -> dict[str, Any]:
        """The fitted thresholds."""
        return {"thresholds": self.thresholds}

    def _module(self, part: int) -> nn.Module:
        return (
            self.net if self.net is not None else self.cascade.classifiers[self.stage_of_part(part)]
        )

    def _start_part(self, part: int) -> None:
        """A fresh optimiser, schedule and batch generator for ``part`` (or the saved ones)."""
        c, h = self.harness.config, self.harness
        module = self._module(part)
        seed = c.seed if self.net is not None else c.seed + self.stage_of_part(part)
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = build_optimizer(c.optimizer, module.parameters(), c.lr, c.weight_decay)
        self.schedule = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, list(c.lr_milestones), c.lr_gamma
        )
        saved = self._saved_part
        if saved is not None and saved["part"] == part:
            load_optimizers({"optimizer": self.optimizer, "schedule": self.schedule}, saved)
            self.generator.set_state(saved["generator"].cpu())
        self._saved_part, self._part = None, part
        self._expensive_correct = None
        stage = self.stage_of_part(part)
        if self.net is None and stage < self.cascade.num_stages - 1:
            # The next model is trained and frozen: its correctness is fixed, computed once.
            x, y = h.split_on_device("train")
            expensive = self.cascade.classifiers[stage + 1]
            self._expensive_correct = h.eval_logits(expensive, x).argmax(-1) == y
            expensive.eval()

    def _loss(self, module: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits (batch, stages trained, C)) of one batch of the part being trained."""
        h, s = self.harness, self.settings
        x, y = h.split_on_device("train")
        logits = h.classify(module, h.inputs(x[idx], True))
        if self.net is not None:
            return multi_exit_ltc_loss(logits, y[idx], s.cost, s.weight), logits
        if self._expensive_correct is None:  # the most expensive model: plain cross-entropy
            return F.cross_entropy(logits, y[idx]), logits.unsqueeze(1)
        correct = self._expensive_correct[idx]
        return ltc_loss(logits, y[idx], correct, s.cost, s.weight), logits.unsqueeze(1)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of the current part; after the last one, fit the thresholds."""
        h = self.harness
        part = epoch // self.settings.epochs
        if self._part != part:
            self._start_part(part)
        module = self._module(part)
        module.train()
        num_samples = h.num_samples("train")
        total, count = 0.0, 0
        for step, idx in enumerate(h.train_batches(num_samples, self.generator)):
            idx = idx.to(h.device)
            loss, logits = self._loss(module, idx)
            stages = None if self.net is not None else [self.stage_of_part(part)]
            h.check_finite(loss, f"LtC loss (part {part})", step, logits, stages)
            h.optimise(loss, [self.optimizer], step)
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        self.schedule.step()
        module.eval()
        if epoch + 1 == self.num_epochs:
            self._fit_thresholds()
        return {"train/loss": total / count, "train/part": float(part)}

    def _fit_thresholds(self) -> None:
        """Cheapest max-softmax thresholds with validation accuracy >= (1 - eps) x the last's."""
        val = self.harness.outputs("val")
        search = ThresholdSearch(
            val.probs, val.labels, val.costs, "max-softmax", num_candidates=None
        )
        target = (1.0 - self.settings.epsilon) * search.last_accuracy
        self.thresholds = search.for_accuracy(target).thresholds

    def state_dict(self) -> dict[str, Any]:
        """Weights, thresholds, and the live part's optimiser, schedule and generator."""
        return {
            "cascade": self.cascade.state_dict(),
            "thresholds": self.thresholds,
            "part": None
            if self._part is None
            else {
                "part": self._part,
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "generator": generator_state(self.generator),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore weights and thresholds; the part state is used when training continues."""
        self.cascade.load_state_dict(state["cascade"])
        self.thresholds = state["thresholds"]
        self._saved_part = state["part"] if self.training_enabled else None
