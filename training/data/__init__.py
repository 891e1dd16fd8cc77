"""Training data: self-blended fakes, face extraction, data-set readers and the crop cache.

    from training.data import CropDataset, build_demo_crops, extract_videos, ffpp_videos
    build_demo_crops("data/demo", size=128)                       # real footage + SBI fakes
    extract_videos(ffpp_videos("/data/ffpp", compression="c23"), "data/ffpp_c23", frames_per_video=270)
    ds = CropDataset("data/demo", "train", hflip=True)           # (x 3×S×S in [0,1], label, video_id)
"""
from .crops import (
    CropCache,
    CropCacheMismatch,
    CropDataset,
    CropRecord,
    cache_recipe,
    caches_recipe,
    check_crops,
    load_crop,
    read_index,
    recipe_mismatch,
    video_labels,
)
from .datasets import (
    FFPP_MANIPULATIONS,
    DatasetLayoutError,
    celebdf_videos,
    count_items,
    dfd_videos,
    ffpp_videos,
    read_celebdf_list,
    read_ffpp_split,
)
from .demo import DemoStats, build_demo_crops
from .extract import ExtractStats, VideoItem, assign_frames, extract_videos, iter_frames, largest_face
from .sbi import self_blend

__all__ = [
    "CropCache", "CropCacheMismatch", "CropDataset", "CropRecord", "DatasetLayoutError", "DemoStats", "ExtractStats",
    "FFPP_MANIPULATIONS", "VideoItem", "assign_frames", "build_demo_crops", "cache_recipe", "caches_recipe", "celebdf_videos", "check_crops", "count_items",
    "dfd_videos", "extract_videos", "ffpp_videos", "iter_frames", "largest_face", "load_crop", "read_celebdf_list",
    "read_ffpp_split", "read_index", "recipe_mismatch", "self_blend", "video_labels",
]
