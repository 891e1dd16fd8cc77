"""Batches and per-sample jitter for training on small face-crop sets (used by :mod:`training.train`)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset


def labels_of(ds: Dataset) -> list[int]:
    """Each item's label, from the datasets' own `labels` where they keep one (through a
    ConcatDataset of several caches too): loading every item for it decodes every crop."""
    if isinstance(ds, ConcatDataset):
        return [label for part in ds.datasets for label in labels_of(part)]
    labels = getattr(ds, "labels", None)
    return list(labels) if labels is not None else [int(ds[i][1]) for i in range(len(ds))]  # type: ignore[arg-type]



class Augment(nn.Module):
    """Light, label-preserving jitter of a 3×S×S crop in [0,1]: random zoom/shift, greyscale, brightness, contrast.

    Why: a small training set of real frames is otherwise memorised image by image; the jitter
    applies to the whole crop, so blending traces inside the face (what separates the classes)
    survive it. Uses torch's RNG (seeded per epoch and per DataLoader worker).
    """

    def __init__(self, zoom: float = 0.15, shift: float = 0.06, brightness: float = 0.1, contrast: float = 0.1,
                 grey: float = 0.25) -> None:
        super().__init__()
        self.zoom, self.shift, self.brightness, self.contrast, self.grey = zoom, shift, brightness, contrast, grey

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1]
        side = max(8, int(round(s * (1 - self.zoom * float(torch.rand(()))))))
        room = s - side
        jit = int(round(self.shift * s))
        cx = int(torch.randint(max(0, room // 2 - jit), min(room, room // 2 + jit) + 1, ()))
        cy = int(torch.randint(max(0, room // 2 - jit), min(room, room // 2 + jit) + 1, ()))
        x = x[:, cy:cy + side, cx:cx + side]
        if side != s:
            x = nn.functional.interpolate(x[None], size=(s, s), mode="bilinear", align_corners=False)[0]
        if self.grey and float(torch.rand(())) < self.grey:  # luminance-only cues must suffice too (grey footage)
            x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).expand(3, -1, -1)
        mean = x.mean()
        c = 1 + self.contrast * (2 * float(torch.rand(())) - 1)
        b = self.brightness * (2 * float(torch.rand(())) - 1)
        return ((x - mean) * c + mean + b).clamp(0, 1)


class EpochCycle(Dataset):
    """Several same-sized datasets (e.g. demo caches built with different SBI seeds) shown one per epoch.

    Fresh self-blended fakes every epoch, as the SBI paper makes them on the fly, at the cost of one
    set per epoch; :func:`train` calls ``set_epoch``. Needs non-persistent DataLoader workers.
    """

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        if not datasets:
            raise ValueError("EpochCycle needs at least one dataset")
        self.datasets = list(datasets)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def current(self) -> Dataset:
        return self.datasets[self.epoch % len(self.datasets)]

    @property
    def labels(self) -> list[int]:
        return labels_of(self.current)

    def __len__(self) -> int:
        return len(self.current)  # type: ignore[arg-type]

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return self.current[i]


def sbi_pair_key(record: Any) -> tuple[str, int]:
    """A crop's frame: the demo data names a real clip's self-blended twin ``<video_id>_sbi``."""
    vid = record.video_id
    return (vid[: -len("_sbi")] if vid.endswith("_sbi") else vid, int(record.frame))


class PairedBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches that keep crops of one frame together (a real face and its self-blended fake).

    Why: SBI trains on such pairs; a batch that holds both sides of a pair makes the loss contrast
    the blended region itself instead of whatever else differs between unrelated images. Needs a
    dataset with CropDataset-style ``records`` (an :class:`EpochCycle` of them is fine).
    """

    def __init__(self, dataset: Dataset, batch_size: int, generator: torch.Generator,
                 key: Callable[[Any], Any] = sbi_pair_key) -> None:
        self.dataset, self.batch_size, self.generator, self.key = dataset, batch_size, generator, key

    def _groups(self) -> list[list[int]]:
        ds = self.dataset.current if isinstance(self.dataset, EpochCycle) else self.dataset
        records = getattr(ds, "records", None)
        if records is None:
            raise ValueError("paired batches need a dataset with records (training.data.CropDataset)")
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(records):
            groups.setdefault(self.key(r), []).append(i)
        return list(groups.values())

    def _batches(self, generator: torch.Generator) -> list[list[int]]:
        """Groups in shuffled order, packed into batches of at most `batch_size` crops: a group that
        would overflow the batch starts the next one (one larger than a batch is split)."""
        groups = self._groups()
        batches, batch = [], []
        for g in torch.randperm(len(groups), generator=generator).tolist():
            group = groups[g]
            if batch and len(batch) + len(group) > self.batch_size:
                batches.append(batch)
                batch = []
            batch.extend(group)
            while len(batch) >= self.batch_size:
                batches.append(batch[: self.batch_size])
                batch = batch[self.batch_size:]
        if batch:
            batches.append(batch)
        return batches

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from self._batches(self.generator)

    def __len__(self) -> int:
        """The next ``__iter__``'s batch count: how groups of one and two pack depends on their order, so
        it is drawn from a copy of the generator in its present state (train seeds it, then asks)."""
        peek = torch.Generator()
        peek.set_state(self.generator.get_state())
        return len(self._batches(peek))
