"""A candidate model run in shadow: scored on the same faces as the production model, recorded in the
verdict's `shadow` block and counted against the production action, never acted on.

Swapping the model is the riskiest change a moderation deployment makes: a new model moves every
threshold, so how many more uploads it would block or send to review is only known on live
traffic. With `DEEPFAKE_SHADOW_MODEL_DIR` set, each scored verdict says what the candidate would
have decided (its own card's threshold and review band, the worker's decision rule), and
`deepfake_shadow_actions_total{action, shadow_action}` is the confusion matrix of the two.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from worker.decision import DecisionPolicy
from worker.engine import Engine
from worker.engine.base import checked_probabilities
from worker.preprocess import CropRecipe
from worker.verdict import aggregate_mean

log = structlog.get_logger("worker.shadow")


@dataclass
class ShadowModel:
    engine: Engine
    policy: DecisionPolicy

    @classmethod
    def for_engine(cls, engine: Engine, settings: Any) -> "ShadowModel":
        """The candidate's policy: its own card's thresholds (DEEPFAKE_REVIEW_THRESHOLD is the
        production model's), the worker's rule and track settings."""
        own_band = settings.model_copy(update={"review_threshold": None})
        return cls(engine, DecisionPolicy.from_settings(engine.card, own_band))

    @property
    def crop_size(self) -> int:
        return self.engine.card.input_size

    @property
    def recipe(self) -> CropRecipe:
        """How the candidate's crops are cut: as its own training crops were."""
        return self.engine.card.recipe()

    def start(self, source: str) -> "ShadowJob":
        return ShadowJob(self, source)


class ShadowJob:
    """One video's shadow scores, by face index. The first failure stops them (logged): a candidate
    model must never cost the production verdict."""

    def __init__(self, model: ShadowModel, source: str) -> None:
        self.model, self.source = model, source
        self.scores: dict[int, float] = {}
        self.failed = False

    def score(self, face_indices: list[int], crops: np.ndarray) -> None:
        if self.failed:
            return
        try:
            probs = checked_probabilities(self.model.engine.predict(crops), len(crops))
        except Exception:  # noqa: BLE001 - see the class docstring
            log.exception("shadow_failed", source=self.source, model=self.model.engine.card.name)
            self.failed = True
            return
        self.scores.update((i, round(float(p), 6)) for i, p in zip(face_indices, probs))

    def block(self, faces: list[dict], *, action: str) -> dict[str, Any] | None:
        """The verdict's `shadow` block (None after a failure): the candidate's scores in place of the
        production model's on the same faces, decided by its policy; `agrees`: its action is `action`."""
        if self.failed:
            return None
        mine = copy.deepcopy(faces)
        for i, face in enumerate(mine):
            face["fake_score"] = self.scores.get(i)
        score = aggregate_mean([f["fake_score"] for f in mine if f["largest"]])
        label, shadow_action, decision = self.model.policy.decide(mine, score)
        return {
            "model": self.model.engine.describe(), "score": round(score, 6), "label": label,
            "action": shadow_action, "agrees": shadow_action == action,
            "decision": {k: decision.get(k) for k in ("rule", "score", "threshold", "review_threshold")},
        }
