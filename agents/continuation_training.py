"""The continuation-value learner as a run-harness algorithm: classifiers, cross-fitting, rule.

Three kinds of unit, one per harness epoch, each checkpointed (the classifier units also
after every classifier epoch, so a kill loses at most one epoch of them):

1. the classifiers, each trained alone with cross-entropy for ``classifier_epochs`` with
   the run's shared training options (optimiser, lr schedule, augmentation, precision)
   and kept from its best validation epoch (the same procedure as the comparison's
   reference, so the learned rule is the only difference);
2. ``folds`` cross-fitting units: the same training on the other folds of the training
   split, scoring the held-out fold, so that every training sample has outputs from
   classifiers that never saw it (0 folds: the rule is fitted on the validation split);
3. the stopping rule, fitted backwards from the last stage on those held-out outputs
   (Longstaff & Schwartz 2001; :mod:`policycascade.agents.continuation`).

The first two kinds do not depend on alpha: the runs of a multi-alpha command train them once
and copy them into the other alphas' runs (:mod:`policycascade.shared_units`).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from policycascade import shared_units
from policycascade.agents.algorithm import Algorithm
from policycascade.agents.continuation import ContinuationValueRule, fit_continuation_rule
from policycascade.crossfit import ReferenceTraining, fold_seed, stratified_folds
from policycascade.data import Split
from policycascade.fold_processes import UnitPool, choose_processes
from policycascade.seeding import seed_torch
from policycascade.supervised import TrainingOptions

if TYPE_CHECKING:
    from policycascade.harness import RunHarness


class ContinuationTraining(Algorithm):
    """Independent classifiers, cross-fitted outputs, then the continuation-value rule."""

    name = "continuation"
    trains_like_reference = True

    def __init__(self, harness: RunHarness, train: bool = True):
        super().__init__(harness, train)
        if harness.alpha is None:
            raise ValueError("the continuation-value learner needs an alpha")
        self.settings = harness.config.continuation
        self.cascade = harness.build_cascade()  # a registered cascade: a frozen copy
        self._initial_state = (
            {}
            if harness.pretrained
            else {k: v.clone() for k, v in self.cascade.state_dict().items()}
        )
        self.held_out_probs: torch.Tensor | None = None  # (train samples, K, C), NaN = not yet
        self.fitted: ContinuationValueRule | None = None
        # A classifier unit stopped part-way: {"unit": epoch, "training": its state}
        self.unit_in_progress: dict[str, Any] | None = None
        # The units this run shares with the other alphas of its process (None: trains alone)
        self._shared: shared_units.SharedUnits | None = None
        # Helper processes training later fold units now (None: this process alone)
        self._helpers: UnitPool | None = None

    @property
    def num_epochs(self) -> int:
        """Classifier training, a unit per fold, the rule (only the rule for given classifiers)."""
        return 1 if self.harness.pretrained else 2 + self.settings.folds

    @property
    def classifier_epochs(self) -> int:
        """Each classifier's cross-entropy budget."""
        return self.settings.classifier_epochs

    def _cumulative_costs(self) -> torch.Tensor:
        """Normalised cost of exiting at each stage, the rule's own MACs included."""
        costs = self.harness.costs
        return torch.tensor(costs.cumulative_macs, dtype=torch.float32) / costs.reference_macs

    def policy_macs(self) -> list[int]:
        """The rule's measured MACs per stage (its small per-stage models)."""
        s, h = self.settings, self.harness
        shape_only = ContinuationValueRule(  # the fitted rule's architecture, to count its MACs
            self.cascade.num_stages,
            h.data.num_classes,
            torch.arange(1, self.cascade.num_stages + 1, dtype=torch.float32),
            h.alpha,
            s.feature_set,
            s.answer,
            s.hidden,
        )
        return shape_only.policy_macs()

    def rule(self) -> ContinuationValueRule | None:
        """The fitted rule (None until its unit has run)."""
        return self.fitted

    def modules(self) -> list[tuple[str, nn.Module]]:
        """The classifiers (trained outside the harness's optimiser steps)."""
        return [(f"classifier stage {t}", c) for t, c in enumerate(self.cascade.classifiers)]

    # -- units ---------------------------------------------------------------------------------

    def _split(self, name: str, idx: torch.Tensor | None = None) -> Split:
        h = self.harness
        x, y = h.split_on_device(name)
        if idx is not None:
            idx = idx.to(h.device)
            x, y = x[idx], y[idx]
        return Split(h.inputs(x), y)

    def _resuming(self, unit: int) -> bool:
        """Whether a checkpoint stopped part-way through classifier unit ``unit``."""
        return self.unit_in_progress is not None and self.unit_in_progress["unit"] == unit

    def _train(
        self, cascade: nn.Module, train: Split, seed: int, unit: int, checkpoint: bool = True
    ) -> None:
        """Reference training of ``cascade``, checkpointed after every classifier epoch."""
        training = ReferenceTraining(
            cascade,
            train,
            self._split("val"),
            self.settings.classifier_epochs,
            seed=seed,
            options=TrainingOptions.from_config(self.harness.config),
        )
        if checkpoint and self._resuming(unit):
            training.load_state_dict(self.unit_in_progress["training"])
        while not training.done:
            training.step()
            if checkpoint and not training.done:
                self.unit_in_progress = {"unit": unit, "training": training.state_dict()}
                self.harness.save_within_epoch()
        if checkpoint:
            self.unit_in_progress = None
        training.finish()

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Unit ``epoch``: the classifiers, one cross-fitting fold, or the rule."""
        h, s = self.harness, self.settings
        # The last unit, or the only one for a user's trained classifiers (a registered cascade)
        if h.pretrained or epoch > s.folds:
            return self._fit_rule()
        if epoch == 0:
            self._join_shared()
        record = None if self._shared is None else self._shared.unit(epoch)
        if record is not None:  # trained by another alpha's run: take its end state
            return self._take_unit(epoch, record)
        try:
            self._start_helpers(epoch)
            if epoch == 0:
                self._train(self.cascade, self._split("train"), h.config.seed, unit=0)
                metrics = {"train/classifiers_trained": 1.0}
            else:
                metrics = self._cross_fit(epoch - 1)
        except BaseException:
            self.close_helpers()
            raise
        if epoch == s.folds:
            self.close_helpers()
        if self._shared is not None:
            self._shared.record(epoch, self._unit_state(epoch), metrics, shared_units.rng_states(h))
        return metrics

    # -- folds trained in helper processes -----------------------------------------------------

    def _start_helpers(self, epoch: int) -> None:
        """Fork helpers for the fold units after ``epoch`` when idle cores are there to use."""
        h, s = self.harness, self.settings
        if self._helpers is not None or s.folds < 1:
            return
        later = list(range(max(epoch, 0) + 1, s.folds + 1))  # fold units after this one
        processes, reason = choose_processes(
            h.config.processes, len(later) + 1, h.device, h.dist.enabled
        )
        if processes < 2 or not later:
            return
        self._helpers = UnitPool(later, self._fold_in_helper, processes - 1)
        weakref.finalize(self, self._helpers.close)  # a run dropped part-way stops them too
        if h.dist.is_main and h.show_progress:
            print(f"cross-fitting: {processes} processes ({reason})", flush=True)

    def close_helpers(self) -> None:
        """Stop the fold helpers (a unit they had not delivered is trained by the run)."""
        if self._helpers is not None:
            self._helpers.close()
            self._helpers = None

    def _fold_in_helper(self, unit: int) -> dict[str, Any]:
        """In a helper process: fold unit ``unit``'s held-out softmaxes and end generator."""
        _, probs = self._fold_outputs(unit - 1, checkpoint=False)
        return {"probs": probs.numpy(), "torch_rng": torch.get_rng_state().numpy()}

    # -- units shared across alphas ------------------------------------------------------------

    def _join_shared(self) -> None:
        """Share this fresh run's alpha-free units with the process's other alphas."""
        h = self.harness
        if self.unit_in_progress is not None:  # resumed part-way: trains alone
            self._shared = None
            return
        start = {  # the same configuration and data, at the same point of the same seeds
            "config": shared_units.config_fingerprint(h.config),
            "data": shared_units.data_digest(h.data),
            "initial_cascade": self._initial_state,
            "rng": shared_units.rng_states(h),
        }
        self._shared = shared_units.join(start["config"], start, h.alpha)

    def _unit_state(self, epoch: int) -> dict[str, Any]:
        """What unit ``epoch`` changed: the classifiers (unit 0), else the held-out outputs."""
        if epoch == 0:
            return {"cascade": self.cascade.state_dict()}
        return {"held_out_probs": self.held_out_probs}

    def _take_unit(self, epoch: int, record: shared_units.UnitRecord) -> dict[str, float]:
        """Leave this run as training unit ``epoch`` would have: state, generators, metrics."""
        if epoch == 0:
            self.cascade.load_state_dict(record.state["cascade"])
            self.cascade.eval()  # as ReferenceTraining.finish leaves it
        else:
            self.held_out_probs = record.state["held_out_probs"]
        shared_units.restore_rng_states(self.harness, record.rng)
        return record.metrics

    def _cross_fit(self, fold: int) -> dict[str, float]:
        """Fold ``fold``'s unit: its held-out outputs, from a helper or trained here."""
        done = None if self._helpers is None else self._helpers.take(fold + 1)
        if done is None:
            held_out, probs = self._fold_outputs(fold)
        else:  # as if trained here: the outputs and torch's generator where it would end
            held_out, probs = self._folds()[fold], torch.from_numpy(done["probs"])
            torch.set_rng_state(torch.from_numpy(done["torch_rng"]))
        y = self.harness.split_on_device("train")[1].cpu()
        if self.held_out_probs is None:
            k, c = self.cascade.num_stages, self.harness.data.num_classes
            self.held_out_probs = torch.full((len(y), k, c), float("nan"))
        self.held_out_probs[held_out] = probs
        correct = (probs.argmax(-1) == y[held_out].unsqueeze(1)).double().mean(0)
        return {f"crossfit/fold_accuracy/stage{t}": float(a) for t, a in enumerate(correct)}

    def _folds(self) -> list[torch.Tensor]:
        """Training-split indices of each fold (stratified, from the run's seed)."""
        _, y = self.harness.split_on_device("train")
        return stratified_folds(y.cpu(), self.settings.folds, self.harness.config.seed)

    def _fold_outputs(
        self, fold: int, checkpoint: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train a copy of the cascade on the other folds; (held-out indices, their softmaxes)."""
        h, s = self.harness, self.settings
        folds = self._folds()
        held_out = folds[fold]
        rest = torch.cat([f for i, f in enumerate(folds) if i != fold])
        with torch.random.fork_rng(devices=[]):  # its weights are replaced just below
            cascade = h.build_cascade()
        cascade.load_state_dict(self._initial_state)
        seed = fold_seed(h.config.seed, fold, s.folds)
        if not (checkpoint and self._resuming(fold + 1)):  # resumed: generators restored
            seed_torch(seed)
        self._train(cascade, self._split("train", rest), seed, fold + 1, checkpoint)
        x, _ = h.split_on_device("train")
        probs = h.eval_logits(cascade, x[held_out.to(h.device)]).softmax(-1).cpu()
        return held_out, probs

    def _fit_rule(self) -> dict[str, float]:
        """Fit the rule on the cross-fitted training outputs (or on validation with 0 folds)."""
        h, s = self.harness, self.settings
        if h.pretrained:
            fit = h.outputs("train")
            probs, labels = fit.probs.cpu(), fit.labels.cpu()
        elif s.folds > 0:
            probs, labels = self.held_out_probs, h.split_on_device("train")[1].cpu()
        else:
            val = h.outputs("val")
            probs, labels = val.probs.cpu(), val.labels.cpu()
        self.fitted = fit_continuation_rule(
            probs,
            labels,
            self._cumulative_costs(),
            h.alpha,
            feature_set=s.feature_set,
            answer=s.answer,
            hidden=s.hidden,
            weight_decay=s.weight_decay,
            seed=h.config.seed,
        ).to(h.device)
        stop = (self.fitted.stop_scores(probs.to(h.device)) >= 0).double().mean(0)
        return {f"policy/fit_stop_share/stage{t}": float(v) for t, v in enumerate(stop)}

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Classifier weights, their initial weights, cross-fitted outputs so far, the rule."""
        return {
            "cascade": self.cascade.state_dict(),
            "initial_cascade": self._initial_state,
            "held_out_probs": self.held_out_probs,
            "rule": None if self.fitted is None else self.fitted.to_dict(),
            "unit_in_progress": self.unit_in_progress,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every unit done so far."""
        self.cascade.load_state_dict(state["cascade"])
        self._initial_state = state["initial_cascade"]
        self.held_out_probs = state["held_out_probs"]
        self.unit_in_progress = state.get("unit_in_progress")  # older checkpoints: none
        rule = state["rule"]
        self.fitted = None if rule is None else ContinuationValueRule.from_dict(rule)
        if self.fitted is not None:
            self.fitted.to(self.harness.device)
