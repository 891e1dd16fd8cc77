"""Validation during training: the epoch's loss and frame/video metrics, gathered across torchrun's
processes so that every rank takes the same scheduler, checkpoint and stopping decisions."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from training.evaluate import accuracy, roc_auc, video_level

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA; fp32 elsewhere (CPU autocast would change the demo's results)."""
    if device.type == "cuda" and amp in AMP_DTYPES:
        return torch.autocast("cuda", dtype=AMP_DTYPES[amp])
    return torch.autocast(device.type, enabled=False)


def validate(model: nn.Module, loader: DataLoader, device: torch.device, amp: str, world: int) -> dict[str, Any]:
    """Mean CE loss and frame/video metrics over the whole validation set (gathered across ranks)."""
    model.eval()
    loss_sum, scores, labels, vids = 0.0, [], [], []
    with torch.no_grad():
        for x, y, v in loader:
            x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device)
            with autocast_for(device, amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            scores.extend(torch.softmax(logits, 1)[:, 1].cpu().tolist())
            labels.extend(y.cpu().tolist())
            vids.extend(str(i) for i in v)
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (loss_sum, scores, labels, vids))
        loss_sum = sum(p[0] for p in parts)
        scores, labels, vids = ([x for p in parts for x in p[k]] for k in (1, 2, 3))
    n = max(len(scores), 1)
    out = {"val_loss": loss_sum / n, "val_acc": accuracy(labels, scores, 0.5)}
    vs, vl, _ = video_level(scores, labels, vids)
    out["val_video_acc"] = accuracy(vl, vs, 0.5)
    try:
        out["val_auc"], out["val_video_auc"] = roc_auc(labels, scores), roc_auc(vl, vs)
    except ValueError:  # one class only
        out["val_auc"] = out["val_video_auc"] = math.nan
    return out
