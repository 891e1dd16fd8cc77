"""The model directory's card (`model.json`): what a model is, how to rebuild it, how to read its scores."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from worker.preprocess import CropRecipe

CARD_FILE = "model.json"
CARD_SCHEMA = "deepfake-model-card/1"


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_: str = Field(CARD_SCHEMA, alias="schema")
    name: str
    version: str
    architecture: str  # a name in training.models' registry
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    input_size: int = 299
    input: str = "RGB face crops, N×3×S×S float32 in [0, 1]; the model normalises each branch itself"
    normalization: dict[str, Any] = Field(default_factory=dict)
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    operating_point: dict[str, Any] | None = None  # how the threshold was chosen, e.g. target FPR
    # Scores in [review_threshold, threshold) are sent to human review rather than allowed; None = no review band.
    review_threshold: float | None = Field(None, ge=0.0, le=1.0)
    review_operating_point: dict[str, Any] | None = None  # how the review threshold was chosen
    trained: bool  # False for a randomly initialised model: its scores mean nothing
    training_data: str = ""
    warning: str | None = None  # a caveat every verdict made with this model repeats (the demo model has one)
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=lambda: {"weights": "weights.pt"})
    # How the training crops were cut (worker.preprocess.CropRecipe); None on cards made before 0.4.0.
    crop_recipe: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _review_below_threshold(self) -> "ModelCard":
        if self.review_threshold is not None and self.review_threshold > self.threshold:
            raise ValueError(f"review_threshold {self.review_threshold} is above threshold {self.threshold}: "
                             "the review band lies below the fake threshold")
        if self.crop_recipe is not None and self.recipe().size != self.input_size:
            raise ValueError(f"crop_recipe size {self.recipe().size} is not input_size {self.input_size}")
        return self

    def recipe(self) -> CropRecipe:
        """How to cut this model's crops: as its training crops were; a card without a recipe (made
        before cards kept one, by preprocessing version 1) gets the paper's 1.3× at its input size."""
        if self.crop_recipe is None:
            return CropRecipe(size=self.input_size, version=1)
        return CropRecipe.from_dict(self.crop_recipe)

    def other_detector(self, detector: str) -> str | None:
        """The detector that found the training faces, where the card names one other than `detector`."""
        trained = self.recipe().detector if self.crop_recipe is not None else None
        return trained if trained != detector else None

    @classmethod
    def load(cls, model_dir: Path) -> "ModelCard":
        path = Path(model_dir) / CARD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {CARD_FILE} in model directory {model_dir}")
        return cls.model_validate(json.loads(path.read_text()))

    def save(self, model_dir: Path) -> Path:
        path = Path(model_dir) / CARD_FILE
        path.write_text(json.dumps(self.model_dump(by_alias=True, mode="json"), indent=2) + "\n")
        return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
