"""Export: the whole detector as serialized StableHLO programs (`jax.export`), one per size
bucket and platform, its weights as inputs beside them, for `serving.py`'s jax-only runtime.

    maskrcnn-jax export --config=configs/X.py --checkpoint=DIR --out=EXPORT_DIR \
        [--batch=1] [--buckets=800x1344,1344x800] [--platforms=cpu,cuda,tpu]

Each program is `MaskRCNN.__call__` from the normalised padded images float32 `[B, H, W, 3]`
and the content sizes int32 `[B, 2]` to all of its outputs (boxes, scores, labels, valid, each
head's outputs such as masks `[B, D, 28, 28]`), with the variables as a first argument: a dict
of arrays keyed by tree path. The directory layout is in `serving.py`'s docstring.

Decisions, and why:

* One artifact per (bucket, platform). The backend seam chooses its forms at trace time: the
  CPU program is traced with the XLA:CPU forms (`execution.backend='cpu'`, unless the config
  asks for 'xla'), which run faster on XLA:CPU; the cuda, rocm and tpu programs are always
  traced with the plain forms ('xla'), because the CPU forms are tuned for XLA:CPU only. A
  single multi-platform program would have to be one trace, so it would force the plain forms
  onto the CPU too; separate files also let a server read only its own platform's programs.
  `jax.export` lowers for platforms that are absent, so a CPU machine exports for all of them.
* Weights are inputs, not constants: the programs stay small (kilobytes to a few megabytes,
  instead of carrying 170 MB of R50-FPN weights each, once per bucket and platform), every
  program of a directory shares one weights file, and serving checks that file against the
  programs' own input signature. The weights file is an uncompressed `.npz` (numpy reads it
  with `allow_pickle=False`) keyed by tree path.
* Resize/normalise/pad and the mask paste stay outside the programs: the first needs the
  original image size and runs in numpy on the host, the paste's canvas is the original image
  size, which no bucket fixes, so it runs in serving's own jax (one compile per canvas).
"""

import datetime
import hashlib
import json
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax import predictor
from maskrcnn_jax import serving
from maskrcnn_jax import structures
from maskrcnn_jax.modeling import mask_head
from maskrcnn_jax.modeling import mask_rcnn

# The platform names of `jax.export`.
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
# How serving maps each known output to original-image pixels (`serving.POSTPROCESS`); any other
# head's output is returned as is for the valid slots ([B, D, ...]) or per image.
KNOWN_OUTPUTS = {
    'boxes': ('boxes_to_original', 'xyxy, padded-input pixels (serving: original pixels)'),
    'scores': ('valid_slots', 'score of the detection, descending per image'),
    'labels': ('valid_slots', '1..K; 0 in invalid slots'),
    'valid': ('selector', 'True for real detections'),
    'masks': ('paste_masks', "probabilities of the detection's class in its box (serving: "
                             'bool at the original resolution, pasted, > mask_thresh)'),
    'keypoints': ('keypoints_to_original', '(x, y, 1) per keypoint, padded-input pixels '
                                           '(serving: original pixels)'),
    'keypoint_scores': ('valid_slots', 'heatmap logit at each keypoint, or detectron2\'s '
                                       'softmax score (model.test.keypoint_score)'),
    'keypoint_valid': ('valid_slots', "True for the keypoints of the detection's class set"),
}
# The keypoint sets' meta (`data.coco` stores K-entry lists, label i + 1 at index i) that the
# manifest's `keypoints` entry carries for a model with a keypoint head.
KEYPOINT_META = ('keypoint_names', 'keypoint_skeleton', 'keypoint_flip_map')


def keypoint_manifest(config: ml_collections.ConfigDict, meta: Mapping) -> Optional[dict]:
  """The manifest's `keypoints` entry: None without a keypoint head, else the keypoints per
  label (`num_keypoints`, label-indexed like the config) and the checkpoint meta's names,
  skeletons (0-based index pairs) and flip maps (K-entry lists, label i + 1 at index i; None
  where the meta has none)."""
  if not config.model.get('keypoint_on', False):
    return None
  out = {'num_keypoints': [int(k) for k in config.model.keypoint_head.num_keypoints]}
  out.update({key[len('keypoint_'):]: meta.get(key) for key in KEYPOINT_META})
  return out


def backend_for(platform: str, config: ml_collections.ConfigDict) -> str:
  """The `execution.backend` a program for `platform` is traced with: 'cpu' (the XLA:CPU forms)
  on the CPU unless the config says 'xla', the plain 'xla' everywhere else."""
  if platform not in PLATFORMS:
    raise ValueError(f'platform {platform!r}: expected one of {PLATFORMS}')
  if platform == 'cpu':
    return 'xla' if config.execution.backend == 'xla' else 'cpu'
  return 'xla'


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def flatten_variables(variables: Any) -> dict[str, np.ndarray]:
  """`{'params/backbone/body/conv1/kernel': numpy array, ...}` of a variables tree (host)."""
  leaves = jax.tree_util.tree_leaves_with_path(variables)
  host = jax.device_get([leaf for _, leaf in leaves])
  return {_path_str(path): np.asarray(leaf) for (path, _), leaf in zip(leaves, host)}


def _mutable_copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  if isinstance(config, ml_collections.FrozenConfigDict):
    return config.as_configdict()
  return config.copy_and_resolve_references()


def inference_fn(model: mask_rcnn.MaskRCNN, treedef: Any, names: Sequence[str]) -> Callable:
  """`(weights {path: array}, images, image_size) -> model outputs`, rebuilding the variables
  tree (`treedef`, leaves in the order of `names`) inside the trace."""
  def fn(weights, images, image_size):
    variables = jax.tree_util.tree_unflatten(treedef, [weights[n] for n in names])
    return model.apply(variables, images, image_size)
  return fn


def export_program(config: ml_collections.ConfigDict, variables: Any, bucket: Sequence[int],
                   batch_size: int, platform: str,
                   build_model: Callable[..., mask_rcnn.MaskRCNN] = mask_rcnn.build_model
                   ) -> jax.export.Exported:
  """The `jax.export.Exported` of the detector for one bucket `(H, W)` and platform.

  `variables` may be arrays or ShapeDtypeStructs (only shapes and dtypes are read).
  `build_model(config)` builds the model (default `mask_rcnn.build_model`; pass your own to
  export a model with heads of your own); it receives the config with `execution.backend`
  set by `backend_for`.
  """
  c = _mutable_copy(config)
  c.execution.backend = backend_for(platform, config)
  model = build_model(c)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  names = [_path_str(path) for path, _ in leaves]
  specs = {n: jax.ShapeDtypeStruct(np.shape(x), x.dtype) for n, (_, x) in zip(names, leaves)}
  h, w = (int(s) for s in bucket)
  images = jax.ShapeDtypeStruct((int(batch_size), h, w, 3), jnp.float32)
  image_size = jax.ShapeDtypeStruct((int(batch_size), 2), jnp.int32)
  fn = inference_fn(model, treedef, names)
  return jax.export.export(jax.jit(fn), platforms=[platform])(specs, images, image_size)


def output_schema(exported: jax.export.Exported, batch_size: int, detections: int) -> dict:
  """`{name: {'shape', 'dtype', 'postprocess', 'frame'}}` of a program's outputs."""
  avals = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
  out = {}
  # The known outputs first, in the Predictor's result order.
  for name in sorted(avals, key=lambda n: (list(KNOWN_OUTPUTS).index(n)
                                           if n in KNOWN_OUTPUTS else len(KNOWN_OUTPUTS), n)):
    aval = avals[name]
    per_detection = tuple(aval.shape[:2]) == (batch_size, detections)
    kind, frame = KNOWN_OUTPUTS.get(name, ('valid_slots' if per_detection else 'per_image',
                                           "a head's output, as the program returns it"))
    out[name] = {'shape': list(aval.shape), 'dtype': str(aval.dtype), 'postprocess': kind,
                 'frame': frame}
  return out


def _sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def export_model(config: ml_collections.ConfigDict, variables: Any, out_dir: str, *,
                 batch_size: int = 1, buckets: Optional[Sequence[Sequence[int]]] = None,
                 platforms: Sequence[str] = ('cpu',), meta: Optional[Mapping] = None,
                 build_model: Callable[..., mask_rcnn.MaskRCNN] = mask_rcnn.build_model
                 ) -> dict:
  """Writes an export directory (see `serving.py`) and returns its manifest.

  Args:
    config: the model config (`config.input` gives the normalisation and resize rule).
    variables: the model's variables `{'params': ..., 'constants': ...}`.
    out_dir: the export directory; refused (FileExistsError) if it already holds a manifest.
    batch_size: images per program call B.
    buckets: padded (H, W) sizes, one program each per platform (default `config.input.buckets`).
    platforms: `jax.export` platform names (`PLATFORMS`).
    meta: the checkpoint's meta (`class_names`, `label_to_category_id`, `source`), if any.
    build_model: as in `export_program`.
  """
  c = _mutable_copy(config)
  if buckets is not None:
    c.input.buckets = tuple(tuple(int(s) for s in b) for b in buckets)
  structures.validate_config(c)  # names a bad bucket as config.input.buckets
  buckets = [tuple(int(s) for s in b) for b in c.input.buckets]
  platforms = list(dict.fromkeys(platforms))
  for p in platforms:
    backend_for(p, c)  # an unknown platform fails before anything is written
  if int(batch_size) < 1:
    raise ValueError(f'batch size {batch_size}: must be >= 1')
  manifest_path = os.path.join(out_dir, serving.MANIFEST)
  if os.path.exists(manifest_path):
    raise FileExistsError(f'{out_dir} already holds an export ({manifest_path}); choose a new '
                          '--out')
  flat = flatten_variables(variables)
  # .npz stores numpy's own dtypes only (bfloat16, an ml_dtypes type, would come back as void).
  odd = [f'{n} ({a.dtype})' for n, a in flat.items() if a.dtype.kind not in 'fiub']
  if odd:
    raise ValueError(f'cannot write these variables to {serving.WEIGHTS}: {", ".join(odd[:5])}')
  os.makedirs(out_dir, exist_ok=True)

  meta = dict(meta or {})
  detections = int(c.model.test.detections_per_img)
  artifacts, schema, convention = [], None, None
  for platform in platforms:
    for bucket in buckets:
      exported = export_program(c, variables, bucket, batch_size, platform, build_model)
      data = exported.serialize()
      name = serving.artifact_name(bucket, platform)
      with open(os.path.join(out_dir, name), 'wb') as f:
        f.write(data)
      artifacts.append({'bucket': list(bucket), 'platform': platform, 'file': name,
                        'backend': backend_for(platform, c), 'bytes': len(data),
                        'sha256': _sha256_bytes(data)})
      schema = schema or output_schema(exported, int(batch_size), detections)
      convention = exported.calling_convention_version
      logging.info('exported %s (%d bytes)', name, len(data))

  weights_path = os.path.join(out_dir, serving.WEIGHTS)
  with open(weights_path, 'wb') as f:
    np.savez(f, **flat)
  weights_digest = serving.sha256_file(weights_path)

  i = c.input
  names = predictor._class_names(meta, int(c.model.num_classes))  # pylint: disable=protected-access
  manifest = {
      'format': serving.FORMAT,
      'format_version': serving.FORMAT_VERSION,
      'jax_version': jax.__version__,
      'calling_convention_version': convention,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'platforms': platforms,
      'buckets': [list(b) for b in buckets],
      'batch_size': int(batch_size),
      'artifacts': artifacts,
      'inputs': {
          'weights': 'dict {tree path: array}: the arrays of weights.npz',
          'images': {'shape': [int(batch_size), 'H', 'W', 3], 'dtype': 'float32',
                     'frame': 'NHWC, normalised, zero-padded at the bottom/right to (H, W)'},
          'image_size': {'shape': [int(batch_size), 2], 'dtype': 'int32',
                         'frame': '(height, width) of the resized content in the padding'},
      },
      'input': {
          'channel_order': str(i.channel_order),
          'pixel_mean': [float(v) for v in i.pixel_mean],
          'pixel_std': [float(v) for v in i.pixel_std],
          'min_size': int(i.min_size),
          'max_size': int(i.max_size),
          'resize_mode': str(i.get('resize', 'torchvision')),
          'resize': ('bilinear, align_corners=False, no antialias, scale = min(min_size / short '
                     'side, max_size / long side), floor, >= 1 pixel (torchvision); normalise '
                     'first, then resize, then zero-pad to the smallest bucket that holds it'
                     if i.get('resize', 'torchvision') == 'torchvision' else
                     'uint8 PIL bilinear to ResizeShortestEdge\'s rounded size (detectron2), '
                     'then normalise, then zero-pad to the smallest bucket that holds it'),
          'size_divisibility': structures.SIZE_DIVISIBILITY,
      },
      'labels': {
          'num_classes': int(c.model.num_classes),
          'class_names': names,
          'label_to_category_id': meta.get('label_to_category_id'),
      },
      'detections_per_img': detections,
      'mask_thresh': float(c.model.test.mask_thresh),
      'drop_empty_boxes': bool(c.model.test.get('drop_empty_boxes', False)),
      'mask_canvas_multiple': mask_head.CANVAS_MULTIPLE,
      'outputs': schema,
      'weights': {'file': serving.WEIGHTS, 'sha256': weights_digest,
                  'arrays': {n: {'shape': list(a.shape), 'dtype': str(a.dtype)}
                             for n, a in flat.items()}},
      'keypoints': keypoint_manifest(c, meta),
      'source': meta.get('source'),
      'model_config': ckpt.model_config_json(c),
  }
  # The manifest last: a directory with one is complete.
  with open(manifest_path, 'w') as f:
    json.dump(ckpt.jsonable(manifest), f, indent=1)
  return manifest


def export_checkpoint(config: ml_collections.ConfigDict, checkpoint: str, out_dir: str,
                      **kwargs) -> dict:
  """`maskrcnn-jax export`: restores a checkpoint directory (training workdir or converted;
  its stored structure is checked against `config`) and `export_model`s it with its meta."""
  structures.validate_config(config)
  abstract = jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0)))
  variables, meta = ckpt.restore_variables(checkpoint, abstract, config)
  return export_model(config, variables, out_dir, meta=meta, **kwargs)


def parse_buckets(text: str) -> Optional[tuple[tuple[int, int], ...]]:
  """'800x1344,1344x800' -> ((800, 1344), (1344, 800)); '' -> None (the config's buckets)."""
  if not text.strip():
    return None
  out = []
  for item in text.split(','):
    parts = item.strip().lower().split('x')
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
      raise ValueError(f'bucket {item.strip()!r}: expected HEIGHTxWIDTH, e.g. 800x1344')
    out.append((int(parts[0]), int(parts[1])))
  return tuple(out)


def parse_platforms(text: str) -> tuple[str, ...]:
  """'cpu,cuda,tpu' -> ('cpu', 'cuda', 'tpu'), each one of `PLATFORMS`."""
  out = tuple(p.strip().lower() for p in text.split(',') if p.strip())
  bad = [p for p in out if p not in PLATFORMS]
  if bad or not out:
    raise ValueError(f'platforms {text!r}: expected a comma-separated list of {PLATFORMS}')
  return out
