"""How scores become a verdict's label and action: the decision policy a worker runs.

The label is the model's call (`fake` at or above the card's threshold). The action is what a
moderation queue does with it: `block` a fake, `review` a real whose score lies in the review band
[review_threshold, threshold), `allow` the rest. The policy is recorded in every scored verdict, and
a stored verdict is reused only under the same policy, so changing a threshold or the rule re-scores.

An upload that could not be judged gets its action from its error code (`DEEPFAKE_ERROR_ACTIONS`
over `DEFAULT_ERROR_ACTIONS`): an uploader can make a file fail on purpose (damage it past FFmpeg's
decoder, pad it past the duration limit, pick a codec the worker lacks), so by default those go to a person instead of
through unjudged. A video without a face is allowed unless DEEPFAKE_NO_FACE_ACTION says otherwise
(where every upload should show a face, not finding one is itself suspect).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from worker.tracks import build_tracks, decide_by_tracks, judge, summarize
from worker.verdict import label_for

ALLOW, REVIEW, BLOCK = "allow", "review", "block"
NO_FACE_ACTION = ALLOW  # default: nothing to judge, the product decides about faces only (DEEPFAKE_NO_FACE_ACTION)
NO_ACTION = "none"  # the settings' word for an error verdict without an action (null)

# What to do with an upload the worker could not judge, by error code. Content the uploader controls
# and that a player may still show (damage another decoder reads past, a codec this build lacks
# plays elsewhere, a long or huge file or a decoding bomb) goes to review; what has no video to show
# is allowed like an upload without faces; where the worker itself could not read the upload (gone,
# or a deployment's permissions) nothing was judged and nothing is to be done with the upload.
DEFAULT_ERROR_ACTIONS: dict[str, str | None] = {
    "not_found": None, "access_denied": None,
    "not_a_video": ALLOW, "no_video_stream": ALLOW,
    "corrupt": REVIEW, "unsupported": REVIEW, "too_large": REVIEW, "too_long": REVIEW, "timeout": REVIEW,
    "internal": REVIEW,
}


def parse_error_actions(text: str) -> dict[str, str | None]:
    """`DEFAULT_ERROR_ACTIONS` with `code=action` pairs (comma-separated) put over it; action `none`
    means no action (null). Unknown codes or actions raise ValueError naming the allowed ones."""
    actions = dict(DEFAULT_ERROR_ACTIONS)
    for item in filter(None, (part.strip() for part in text.split(","))):
        code, sep, action = (word.strip() for word in item.partition("="))
        if not sep or code not in actions or action not in (ALLOW, REVIEW, BLOCK, NO_ACTION):
            raise ValueError(f"{item!r} is not code=action with code one of {', '.join(actions)} and action one "
                             f"of {ALLOW}, {REVIEW}, {BLOCK}, {NO_ACTION}")
        actions[code] = None if action == NO_ACTION else action
    return actions


@dataclass(frozen=True)
class DecisionPolicy:
    KEY_FIELDS: ClassVar[tuple[str, ...]] = ("rule", "threshold", "review_threshold", "track_score", "min_track_frames",
                                             "mean_floor")
    # Key fields a verdict written before them lacks, and the value that verdict was decided under.
    ADDED_FIELDS: ClassVar[dict[str, Any]] = {"mean_floor": False}

    threshold: float
    review_threshold: float | None = None
    rule: str = "tracks"  # tracks | mean (the paper's)
    track_score: str = "mean"
    min_track_frames: int = 3
    # Under `tracks`, the paper's video score is the least the decision score can be: a long enough
    # real track (a static bystander, a webcam overlay) no longer outweighs the largest face, whose
    # own track a moving camera breaks into pieces too short to count. Verdicts before 0.4.1: False.
    mean_floor: bool = True
    operating_point: dict | None = None
    review_operating_point: dict | None = None
    error_actions: Mapping[str, str | None] = field(default_factory=lambda: dict(DEFAULT_ERROR_ACTIONS), hash=False)
    no_face_action: str = NO_FACE_ACTION

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
                   operating_point=card.operating_point, review_operating_point=review_op,
                   error_actions=parse_error_actions(settings.error_actions), no_face_action=settings.no_face_action)

    def key(self) -> dict[str, Any]:
        """What a stored verdict's `decision.policy` must equal for the verdict to be reused."""
        return {name: getattr(self, name) for name in self.KEY_FIELDS}

    @classmethod
    def from_key(cls, key: dict[str, Any], **changes: Any) -> "DecisionPolicy":
        """The policy a stored verdict's `decision.policy` names (fields it predates at the value it was
        decided under), with `changes` put over it."""
        return cls(**{**cls.ADDED_FIELDS, **{name: key[name] for name in cls.KEY_FIELDS if name in key}, **changes})

    @classmethod
    def names_a_policy(cls, key: dict[str, Any]) -> bool:
        """Whether a stored verdict's `decision.policy` names every field but those added since."""
        return set(cls.KEY_FIELDS) - set(cls.ADDED_FIELDS) <= set(key)

    def published(self) -> dict[str, Any]:
        """What workers publish for enqueuers to match duplicates on: the scoring key and the actions
        for uploads without a score (a job finished under other ones is not an answer either)."""
        return {**self.key(), "error_actions": dict(self.error_actions), "no_face_action": self.no_face_action}

    def error_action(self, code: str) -> str | None:
        return self.error_actions.get(code)

    def answers(self, stored: dict) -> bool:
        """Whether a stored verdict's label and action are what this policy would give: a scored one
        made under the same key, an error one with this policy's action for its code."""
        status = stored.get("status")
        if status == "ok":
            return (stored.get("decision") or {}).get("policy") == self.key()
        if status == "error":
            return stored.get("action") == self.error_action((stored.get("error") or {}).get("code"))
        return stored.get("action") == self.no_face_action

    def action(self, label: str, score: float) -> str:
        if label == "fake":
            return BLOCK
        if self.review_threshold is not None and score >= self.review_threshold:
            return REVIEW
        return ALLOW

    def decide(self, faces: list[dict], mean_score: float) -> tuple[str, str, dict]:
        """(label, action, the verdict's `decision` block with its `tracks`) for scored faces.

        `mean_score` is the paper's video score. Under the `tracks` rule the highest score of a long
        enough track decides, or the paper's score where it is higher (`mean_floor`); with no such track
        the paper's rule applies. Scores are compared with the
        thresholds as the verdict publishes them, rounded to 6 decimals, so that whoever reads the
        verdict can recompute its label and action.
        """
        mean_score = round(float(mean_score), 6)
        summaries = summarize(build_tracks(faces), threshold=self.threshold, strategy=self.track_score,
                              min_frames=self.min_track_frames)
        decision: dict[str, Any] = {
            "rule": self.rule, "threshold": self.threshold, "operating_point": self.operating_point,
            "review_threshold": self.review_threshold, "review_operating_point": self.review_operating_point,
            "track_score": self.track_score, "min_track_frames": self.min_track_frames, "policy": self.key(),
            "tracks": summaries,
        }
        label, score, decision["rule"] = self._label(summaries, mean_score)
        if decision["rule"] == "tracks":
            decision["track_score_max"] = score
        decision["score"] = score
        return label, self.action(label, score), decision

    def _label(self, summaries: list[dict], mean_score: float) -> tuple[str, float, str]:
        """(label, the score it was decided on, the rule that decided) for judged tracks."""
        if self.rule == "tracks":
            by_tracks, top = decide_by_tracks(summaries)
            if by_tracks is not None and not (self.mean_floor and mean_score > top):
                return by_tracks, top, "tracks"
        return label_for(mean_score, self.threshold), mean_score, "mean"  # no track long enough: the paper's rule

    def redecide(self, verdict: dict) -> tuple[str, str, float]:
        """(label, action, decision score) this policy gives a stored scored verdict, from the frame
        scores its tracks keep, without scoring it again: what a threshold, band or rule would change."""
        summaries = [judge(t["frame_scores"], threshold=self.threshold, strategy=self.track_score,
                           min_frames=self.min_track_frames) for t in verdict["tracks"]]
        label, score, _ = self._label(summaries, round(float(verdict["score"]), 6))
        return label, self.action(label, score), score

    def decisive(self, largest_scores: list[float], *, frames: int, margin: float) -> bool:
        """Early exit: the first `frames` scores all lie `margin` above the threshold, or all `margin`
        below the lowest boundary (the review threshold when there is a band), so neither the label
        nor the action can be close."""
        if frames <= 0 or len(largest_scores) < frames:
            return False
        head = np.asarray(largest_scores[:frames])
        low = self.threshold if self.review_threshold is None else self.review_threshold
        return bool(np.all(head >= self.threshold + margin) or np.all(head <= low - margin))
