"""How scores become a verdict's label and action: the decision policy a worker runs.

The label is the model's call (`fake` at or above the card's threshold). The action is what a
moderation queue does with it: `block` a fake, `review` a real whose score lies in the review band
[review_threshold, threshold), `allow` the rest. The policy is recorded in every scored verdict, and
a stored verdict is reused only under the same policy, so changing a threshold or the rule re-scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.tracks import build_tracks, decide_by_tracks, summarize
from worker.verdict import label_for

ALLOW, REVIEW, BLOCK = "allow", "review", "block"
NO_FACE_ACTION = ALLOW  # nothing to judge: the product decides about faces only


@dataclass(frozen=True)
class DecisionPolicy:
    threshold: float
    review_threshold: float | None = None
    rule: str = "tracks"  # tracks | mean (the paper's)
    track_score: str = "mean"
    min_track_frames: int = 3
    operating_point: dict | None = None
    review_operating_point: dict | None = None

    def __post_init__(self) -> None:
        if self.review_threshold is not None and self.review_threshold > self.threshold:
            raise ValueError(f"review threshold {self.review_threshold} is above the model's threshold "
                             f"{self.threshold}: the review band lies below the fake threshold")

    @classmethod
    def from_settings(cls, card: Any, settings: Any) -> "DecisionPolicy":
        """The card's thresholds, with DEEPFAKE_REVIEW_THRESHOLD taking the card's review threshold's place."""
        if settings.review_threshold is not None:
            review, review_op = settings.review_threshold, {"source": "DEEPFAKE_REVIEW_THRESHOLD"}
        else:
            review, review_op = card.review_threshold, card.review_operating_point
        return cls(threshold=card.threshold, review_threshold=review, rule=settings.decision,
                   track_score=settings.track_score, min_track_frames=settings.min_track_frames,
                   operating_point=card.operating_point, review_operating_point=review_op)

    def key(self) -> dict[str, Any]:
        """What a stored verdict's `decision.policy` must equal for the verdict to be reused."""
        return {"rule": self.rule, "threshold": self.threshold, "review_threshold": self.review_threshold,
                "track_score": self.track_score, "min_track_frames": self.min_track_frames}

    def action(self, label: str, score: float) -> str:
        if label == "fake":
            return BLOCK
        if self.review_threshold is not None and score >= self.review_threshold:
            return REVIEW
        return ALLOW

    def decide(self, faces: list[dict], mean_score: float) -> tuple[str, str, dict]:
        """(label, action, the verdict's `decision` block with its `tracks`) for scored faces.

        `mean_score` is the paper's video score. Under the `tracks` rule the highest score of a long
        enough track decides; with no such track the paper's rule applies.
        """
        summaries = summarize(build_tracks(faces), threshold=self.threshold, strategy=self.track_score,
                              min_frames=self.min_track_frames)
        decision: dict[str, Any] = {
            "rule": self.rule, "threshold": self.threshold, "operating_point": self.operating_point,
            "review_threshold": self.review_threshold, "review_operating_point": self.review_operating_point,
            "track_score": self.track_score, "min_track_frames": self.min_track_frames, "policy": self.key(),
            "tracks": summaries,
        }
        label, score = label_for(mean_score, self.threshold), mean_score
        if self.rule == "tracks":
            by_tracks, top = decide_by_tracks(summaries)
            if by_tracks is None:
                decision["rule"] = "mean"  # no track long enough to judge: the paper's rule
            else:
                label, score = by_tracks, top
                decision["track_score_max"] = top
        decision["score"] = round(float(score), 6)
        return label, self.action(label, score), decision

    def decisive(self, largest_scores: list[float], *, frames: int, margin: float) -> bool:
        """Early exit: the first `frames` scores all lie `margin` above the threshold, or all `margin`
        below the lowest boundary (the review threshold when there is a band), so neither the label
        nor the action can be close."""
        if frames <= 0 or len(largest_scores) < frames:
            return False
        head = np.asarray(largest_scores[:frames])
        low = self.threshold if self.review_threshold is None else self.review_threshold
        return bool(np.all(head >= self.threshold + margin) or np.all(head <= low - margin))
