"""Images in, batches out: labelled image sets, the paper's transforms and the input pipelines.

- :mod:`~nad_ext.data.imagesets`: :class:`ImageSet` (one split, in memory or files),
  ImageFolder trees (:func:`image_folder`), :func:`load_batch`;
- :mod:`~nad_ext.data.shapes`: the built-in generated data set (:func:`generated_shapes`);
- :mod:`~nad_ext.data.transforms`: the paper's training and evaluation transforms, every random
  draw from an explicit generator;
- :mod:`~nad_ext.data.decode`: JPEG by libjpeg-turbo or batched nvjpeg, other formats by PIL;
- :mod:`~nad_ext.data.batch_transforms`: crops as numbers, resampled image by image or batched;
- :mod:`~nad_ext.data.pipeline`: the loaders the trainer asks for each step's batch
  (``exact`` and ``fast``), the bad-image policy, prefetching;
- :mod:`~nad_ext.data.cache`: ``nad prepare-data`` caches (decoded once, memory-mapped).

May import: :mod:`nad_ext._utils` and :mod:`nad_ext.distributed`; nothing here knows about
models, gates or training. The image-set API is importable from here (``data.image_folder``,
``data.generated_shapes``, ``data.load_batch``, ...); the pipeline and the cache from their modules.
"""
from nad_ext.data.imagesets import IMAGE_EXTENSIONS, ImageSet, image_folder, load_batch, read_image
from nad_ext.data.shapes import SHAPE_CLASSES, generated_shapes
from nad_ext.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, TRAIN_SCALE, eval_transform, normalise,
                                     random_resized_crop_params, train_crop_params, train_transform)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "SHAPE_CLASSES", "TRAIN_SCALE", "ImageSet", "eval_transform",
    "generated_shapes", "image_folder", "load_batch", "normalise", "random_resized_crop_params", "read_image",
    "train_crop_params", "train_transform",
]
