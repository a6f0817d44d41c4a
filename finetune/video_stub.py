"""Processors of image+video families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, SmolVLM...) on a machine without
torchvision.

transformers 5.23 builds such a processor with its video processor, and every video processor needs
torchvision; the image side does not (the PIL image processors). finetune trains on images only, so where
torchvision is missing the processor is built with transformers' plain `BaseVideoProcessor` (which needs
no torchvision) in the video slot: `with video_stub.images_only(): AutoProcessor.from_pretrained(...)`.
Nothing changes where torchvision is installed.
"""

from __future__ import annotations

import contextlib
import importlib.util


def torchvision_missing() -> bool:
    return importlib.util.find_spec("torchvision") is None


class ImagesOnlyVideoProcessor:
    """Stands in for `AutoVideoProcessor` (itself a torchvision placeholder here) while a processor loads."""

    @staticmethod
    def from_pretrained(*args, **kwargs):
        from transformers.video_processing_utils import BaseVideoProcessor

        return BaseVideoProcessor()


@contextlib.contextmanager
def images_only():
    """While inside: a processor's video slot gets a `BaseVideoProcessor` when torchvision is missing."""
    if not torchvision_missing():
        yield
        return
    from transformers import processing_utils
    from transformers.video_processing_utils import VideoProcessorMixin

    names = processing_utils._LazyAutoProcessorMapping._MAPPING_NAMES
    module = processing_utils.transformers_module
    saved_names, saved_mixin = dict(names), module.__dict__.get("VideoProcessorMixin")
    names["video_processor"] = (__name__, "ImagesOnlyVideoProcessor")
    module.VideoProcessorMixin = VideoProcessorMixin  # the class a processor checks its video slot against
    try:
        yield
    finally:
        names.clear()
        names.update(saved_names)
        if saved_mixin is None:
            module.__dict__.pop("VideoProcessorMixin", None)
        else:
            module.VideoProcessorMixin = saved_mixin
