"""Runs an exported detector (`maskrcnn-jax export`) with nothing but jax and numpy.

    from maskrcnn_jax import serving
    runtime = serving.load('exported/')           # checks the manifest, programs and weights
    result = runtime(image_uint8_hwc)             # the Predictor's result format
    results = runtime([image_a, image_b])

This file imports nothing else of maskrcnn_jax, nor flax or the configs, so a serving process
needs the export directory, jax and numpy only (tested with those imports blocked). It holds its
own copies of what runs outside the exported program, each tested against the original:
resize/normalise/pad (`prepare_image`, equal to `data.transforms.prepare_image` bit for bit),
the bucket choice (`structures.choose_bucket`), the box rescale (`box_head.boxes_to_original`)
and the mask paste (`paste_masks`, `ops.masks.paste_masks`).

An export directory (written by `maskrcnn_jax.export`, read here) holds:

    manifest.json                 format, versions, buckets, batch, input rule, labels, schema
    weights.npz                   one array per variable, keyed by its tree path
                                  ('params/backbone/body/conv1/kernel'); plain numpy, no pickle
    detector_{H}x{W}_{platform}.jaxexport
                                  one serialized `jax.export.Exported` per bucket and platform:
                                  (weights dict, images f32 [B, H, W, 3], image_size i32 [B, 2])
                                  -> the dict of `MaskRCNN.__call__`
"""

import hashlib
import json
import math
import os
import re
from typing import Optional, Sequence, Union

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

FORMAT = 'maskrcnn_jax.export'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
WEIGHTS = 'weights.npz'
ARTIFACT_SUFFIX = '.jaxexport'
# torchvision paste_masks_in_image(padding=1), as `ops.masks.MASK_PADDING`.
MASK_PADDING = 1
# The output postprocess kinds a manifest may name (`outputs[name]['postprocess']`).
POSTPROCESS = ('boxes_to_original', 'keypoints_to_original', 'valid_slots', 'paste_masks',
               'selector', 'per_image')


class ExportFormatError(ValueError):
  """An export directory this runtime must not run: its manifest's format or versions, a
  program for another platform, or weights that do not fit the programs. Names the file."""


def artifact_name(bucket: Sequence[int], platform: str) -> str:
  """The file name of the program for a (height, width) bucket on a platform."""
  return f'detector_{int(bucket[0])}x{int(bucket[1])}_{platform}{ARTIFACT_SUFFIX}'


# ============================================================================ preprocessing
# Copies of `data.transforms` (torchvision `GeneralizedRCNNTransform`), kept operation for
# operation so that the float32 results are identical (tests/test_export.py compares them).


def resize_shape(h: int, w: int, min_size: float, max_size: float,
                 mode: str = 'torchvision') -> tuple[int, int]:
  """(new_h, new_w) = floor(dim * min(min_size / short side, max_size / long side)), in double
  precision as torchvision, at least one pixel per side; mode 'detectron2': its
  ResizeShortestEdge (short side to min_size, both shrunk if the long one passes max_size, each
  rounded half up)."""
  if mode == 'detectron2':
    short, size = min(h, w), float(min_size)
    new_h, new_w = (size, size / short * w) if h < w else (size / short * h, size)
    if max(new_h, new_w) > max_size:
      shrink = float(max_size) / max(new_h, new_w)
      new_h, new_w = new_h * shrink, new_w * shrink
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))
  scale = min(float(min_size) / min(h, w), float(max_size) / max(h, w))
  return (max(1, int(np.floor(float(h) * scale))), max(1, int(np.floor(float(w) * scale))))


def _linear_indices(in_size: int, out_size: int):
  """torch's align_corners=False linear taps: (i0 int64 [out], i1 int64 [out], lambda f32)."""
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = i0 + (i0 < in_size - 1)
  lam = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
  return i0, i1, lam


def resize_image(img: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
  """float32 `[new_h, new_w, C]`: bilinear, align_corners=False, no antialias (rows, then
  columns), as torch `F.interpolate(mode='bilinear')`."""
  x = np.asarray(img, dtype=np.float32)
  h, w = x.shape[:2]
  if (h, w) == (new_h, new_w):
    return x.copy()
  r0, r1, rl = _linear_indices(h, new_h)
  c0, c1, cl = _linear_indices(w, new_w)
  extra = (1,) * (x.ndim - 2)
  rl = rl.reshape((-1, 1) + extra)
  rows = x[r0] * (np.float32(1) - rl) + x[r1] * rl
  cl = cl.reshape((1, -1) + extra)
  return (rows[:, c0] * (np.float32(1) - cl) + rows[:, c1] * cl).astype(np.float32, copy=False)


def normalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float],
              channel_order: str) -> np.ndarray:
  """float32 `[H, W, 3]` `(x - mean) / std` of RGB pixels (0..255 units) in `channel_order`."""
  x = np.asarray(img, dtype=np.float32)
  if channel_order == 'BGR':
    x = x[..., ::-1]
  elif channel_order != 'RGB':
    raise ValueError(f"channel_order {channel_order!r}: expected 'RGB' or 'BGR'")
  inv_std = np.float32(1.0) / np.asarray(std, np.float32)
  return ((x - np.asarray(mean, np.float32)) * inv_std).astype(np.float32)


def choose_bucket(height: int, width: int, buckets: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The smallest-area bucket (h, w) holding `height x width` (ties: the smaller tuple)."""
  fitting = [tuple(map(int, b)) for b in buckets if b[0] >= height and b[1] >= width]
  if not fitting:
    raise ValueError(f'no exported size bucket in {tuple(map(tuple, buckets))} holds a '
                     f'{height}x{width} image; export one that does (--buckets)')
  return min(fitting, key=lambda b: (b[0] * b[1], b))


def prepare_image(image: np.ndarray, min_size: int, max_size: int, mean: Sequence[float],
                  std: Sequence[float], channel_order: str,
                  buckets: Sequence[Sequence[int]], resize: str = 'torchvision'):
  """One uint8 `[h, w, 3]` RGB image -> `(float32 [Hb, Wb, 3], (new_h, new_w), (Hb, Wb))`:
  normalise, resize, zero-pad at the bottom/right to the smallest bucket that holds it
  (`resize='detectron2'`: PIL's uint8 bilinear resize first, then normalise; needs pillow)."""
  h, w = image.shape[:2]
  new_h, new_w = resize_shape(h, w, min_size, max_size, resize)
  if resize == 'detectron2':
    from PIL import Image  # pylint: disable=g-import-not-at-top  (only this mode needs it)
    small = image if (h, w) == (new_h, new_w) else np.asarray(
        Image.fromarray(np.asarray(image, np.uint8)).resize((new_w, new_h), Image.BILINEAR))
    x = normalize(small, mean, std, channel_order)
  else:
    x = resize_image(normalize(image, mean, std, channel_order), new_h, new_w)
  bucket = choose_bucket(new_h, new_w, buckets)
  if (new_h, new_w) != bucket:
    padded = np.zeros(bucket + x.shape[2:], np.float32)
    padded[:new_h, :new_w] = x
    x = padded
  return x, (new_h, new_w), bucket


def keypoints_to_original(keypoints: np.ndarray, original_hw: Sequence[int],
                          resized_hw: Sequence[int]) -> np.ndarray:
  """float32 `[..., K, 3]` (x, y, 1) from the resized input frame to original pixels
  (torchvision `resize_keypoints`, as the keypoint head's postprocess)."""
  out = np.array(keypoints, np.float32)
  out[..., 0] *= np.float32(original_hw[1]) / np.float32(resized_hw[1])
  out[..., 1] *= np.float32(original_hw[0]) / np.float32(resized_hw[0])
  return out


def boxes_to_original(boxes: np.ndarray, original_hw: Sequence[int],
                      resized_hw: Sequence[int]) -> np.ndarray:
  """float32 `[D, 4]` xyxy from the resized input frame to original pixels (torchvision
  `resize_boxes`: per-axis float32 ratios original / resized)."""
  ratio_h = np.float32(original_hw[0]) / np.float32(resized_hw[0])
  ratio_w = np.float32(original_hw[1]) / np.float32(resized_hw[1])
  ratio = np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)
  return (np.asarray(boxes) * ratio).astype(np.float32)


# ============================================================================ mask paste
# A copy of `ops.masks.paste_masks` (torchvision `paste_masks_in_image`): the paste depends on
# the original image size, which no exported program fixes, so it runs here, jitted per canvas.


def _true_divide(a: jnp.ndarray, d) -> jnp.ndarray:
  """`a / d` as IEEE division (XLA turns division by a constant into a multiplication by its
  reciprocal, an ulp off), as `ops.boxes.true_divide`."""
  _, den = lax.optimization_barrier((a, jnp.full(a.shape, d, a.dtype)))
  return a / den


def _expanded_int_boxes(boxes: jnp.ndarray, m: int) -> jnp.ndarray:
  scale = jnp.float32(m + 2 * MASK_PADDING) / jnp.float32(m)
  boxes = boxes.astype(jnp.float32)
  w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
  h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
  x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
  y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
  expanded = jnp.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=-1)
  finite = jnp.all(jnp.isfinite(expanded), axis=-1, keepdims=True)
  expanded = jnp.where(finite, expanded, -1.0)
  return jnp.trunc(jnp.clip(expanded, -2.0**30, 2.0**30)).astype(jnp.int32)


def _resize_matrix(lo: jnp.ndarray, hi: jnp.ndarray, in_size: int, out_size: int) -> jnp.ndarray:
  """`[D, out_size, in_size]`: canvas row y samples the padded mask resized to `hi - lo + 1`
  pixels at `lo` (torch's CPU bilinear index and weight rules); zero outside `[lo, hi]`."""
  length = jnp.maximum(hi - lo + 1, 1)
  ratio = _true_divide(jnp.full(length.shape, in_size, jnp.float32), length.astype(jnp.float32))
  pix = jnp.arange(out_size, dtype=jnp.int32)[None, :]
  src = jnp.maximum(ratio[:, None] * ((pix - lo[:, None]).astype(jnp.float32) + 0.5) - 0.5, 0.0)
  i0 = src.astype(jnp.int32)
  lam = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
  i1 = jnp.where(i0 < in_size - 1, i0 + 1, i0)
  inside = (pix >= lo[:, None]) & (pix <= hi[:, None])
  cols = jnp.arange(in_size, dtype=jnp.int32)[None, None, :]
  mat = (jnp.where(cols == i0[..., None], (1.0 - lam)[..., None], 0.0)
         + jnp.where(cols == i1[..., None], lam[..., None], 0.0))
  return jnp.where(inside[..., None], mat, 0.0)


def paste_masks(masks: jnp.ndarray, boxes: jnp.ndarray, out_h: int, out_w: int) -> jnp.ndarray:
  """float32 `[D, out_h, out_w]` probabilities of float `[D, M, M]` masks pasted into their
  float `[D, 4]` xyxy boxes (canvas pixels): pad by one pixel, expand the box by (M + 2) / M,
  truncate, resize bilinearly (align_corners=False) as `R_y @ mask @ R_x^T`."""
  m = masks.shape[-1]
  size = m + 2 * MASK_PADDING
  padded = jnp.pad(masks.astype(jnp.float32),
                   ((0, 0), (MASK_PADDING, MASK_PADDING), (MASK_PADDING, MASK_PADDING)))
  ib = _expanded_int_boxes(boxes, m)
  ry = _resize_matrix(ib[:, 1], ib[:, 3], size, out_h)
  rx = _resize_matrix(ib[:, 0], ib[:, 2], size, out_w)
  hp = lax.Precision.HIGHEST
  rows = jnp.einsum('dij,dxj->dix', padded, rx, precision=hp)
  return jnp.einsum('dyi,dix->dyx', ry, rows, precision=hp)


_paste_binary = jax.jit(lambda masks, boxes, h, w, t: paste_masks(masks, boxes, h, w) > t,
                        static_argnums=(2, 3, 4))


# ============================================================================ loading


def current_platform() -> str:
  """The `jax.export` platform name of JAX's default device: 'cpu', 'cuda', 'rocm' or 'tpu'."""
  device = jax.devices()[0]
  if device.platform == 'gpu':
    version = str(getattr(device.client, 'platform_version', '')).lower()
    return 'rocm' if 'rocm' in version else 'cuda'
  return device.platform


def _version_tuple(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in re.findall(r'\d+', str(text))[:3])


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


def read_manifest(directory: str) -> dict:
  """The manifest of an export directory, refused (ExportFormatError) when this runtime cannot
  run it: another format, a newer format version, an artifact written by a newer jax than this
  one (jax.export guarantees that newer jax reads older artifacts, within its compatibility
  window, not the reverse), or a calling convention this jax does not support."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory} is not an export directory: {path} does not exist '
                            '(write one with `maskrcnn-jax export`)')
  try:
    with open(path) as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise ExportFormatError(f'{path} is not valid JSON: {e}') from e
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise ExportFormatError(f'{path} is not a {FORMAT} manifest (format '
                            f'{manifest.get("format") if isinstance(manifest, dict) else None!r})')
  version = manifest.get('format_version')
  if version != FORMAT_VERSION:
    raise ExportFormatError(
        f'{path} has format version {version!r}; this runtime reads version {FORMAT_VERSION} '
        'only: export again with this version of maskrcnn_jax, or serve with the version that '
        'wrote it')
  exported_by = str(manifest.get('jax_version') or '')
  if not _version_tuple(exported_by) or _version_tuple(exported_by) > _version_tuple(
      jax.__version__):
    raise ExportFormatError(
        f'{path} was exported with jax {exported_by or "(unknown)"}, this runtime has jax '
        f'{jax.__version__}: a serialized program can only be relied on with the jax that wrote '
        'it or a newer one; upgrade jax here or export with this jax')
  convention = manifest.get('calling_convention_version')
  lo = jax.export.minimum_supported_calling_convention_version
  hi = jax.export.maximum_supported_calling_convention_version
  if not isinstance(convention, int) or not lo <= convention <= hi:
    raise ExportFormatError(
        f'{path}: calling convention version {convention!r} is outside what jax '
        f'{jax.__version__} supports ({lo}..{hi}); export again with a jax that both support')
  return manifest


def _listing(items: Sequence[str], limit: int = 5) -> str:
  more = f' (and {len(items) - limit} more)' if len(items) > limit else ''
  return ', '.join(items[:limit]) + more


def _check_weights(directory: str, weights: dict, expected: dict) -> None:
  """Refuses weights that are not exactly the programs' weight inputs `expected` ({name:
  aval}), naming the missing, unexpected and misshaped ones (the first five of each kind)."""
  path = os.path.join(directory, WEIGHTS)
  missing = sorted(set(expected) - set(weights))
  unexpected = sorted(set(weights) - set(expected))
  wrong = [f'{name} is {weights[name].shape} {weights[name].dtype}, the program takes '
           f'{tuple(aval.shape)} {aval.dtype}'
           for name, aval in sorted(expected.items()) if name in weights
           and (tuple(weights[name].shape) != tuple(aval.shape)
                or np.dtype(weights[name].dtype) != np.dtype(aval.dtype))]
  problems = [f'missing {_listing(missing)}'] if missing else []
  if unexpected:
    problems.append(f'not taken by the program: {_listing(unexpected)}')
  if wrong:
    more = f' (and {len(wrong) - 5} more misshaped)' if len(wrong) > 5 else ''
    problems.append('; '.join(wrong[:5]) + more)
  if problems:
    raise ExportFormatError(f'{path} does not fit the exported programs: {"; ".join(problems)}')


class Runtime:
  """An exported detector on raw images, with the Predictor's call and result format.

  Images are grouped by bucket and run in batches of the exported `batch_size` (a short last
  batch is padded with blank images). Each result is a dict of numpy arrays for the N valid
  detections, sorted by score: `boxes` float32 `[N, 4]` xyxy in original-image pixels, `scores`
  float32 `[N]`, `labels` int32 `[N]` (1..K), `masks` bool `[N, H, W]` at the original
  resolution (probability > the manifest's `mask_thresh`) with a mask head, `keypoints`
  float32 `[N, K, 3]` in original pixels, `keypoint_scores` and `keypoint_valid` `[N, K]` with
  a keypoint head, and any other head's per-detection outputs as the program returns them
  (valid slots only).

  Resize/normalise/pad run on the host in numpy, the detector in the exported program (compiled
  once per bucket on first use), the paste on the device in this module's jax (once per canvas
  size, the original size rounded up to `mask_canvas_multiple`).

  Attributes: `manifest` (dict), `platform`, `batch_size`, `buckets`, `class_names` (indexed by
  label, or None), `exported` ({bucket: jax.export.Exported}).
  """

  def __init__(self, directory: str, manifest: dict, exported: dict, weights: dict,
               platform: str):
    self.directory = directory
    self.manifest = manifest
    self.platform = platform
    self.exported = exported
    self.batch_size = int(manifest['batch_size'])
    self.buckets = [tuple(int(s) for s in b) for b in manifest['buckets']]
    self.class_names = (manifest.get('labels') or {}).get('class_names')
    self._input = manifest['input']
    self._outputs = manifest['outputs']
    self._mask_thresh = float(manifest.get('mask_thresh', 0.5))
    self._drop_empty = bool(manifest.get('drop_empty_boxes', False))
    self._canvas_multiple = int(manifest.get('mask_canvas_multiple', 1))
    self._weights = jax.device_put(weights)
    # exported.call traced under jit: one compile per bucket, the weights stay arguments.
    self._calls = {bucket: jax.jit(e.call) for bucket, e in exported.items()}

  def preprocess(self, image: np.ndarray):
    """`(padded float32 [Hb, Wb, 3], (resized_h, resized_w), bucket (Hb, Wb))` of one image."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'expected an [H, W, 3] RGB image, got shape {image.shape}')
    i = self._input
    return prepare_image(image, i['min_size'], i['max_size'], i['pixel_mean'], i['pixel_std'],
                         i['channel_order'], self.buckets, i.get('resize_mode', 'torchvision'))

  def detect(self, images: np.ndarray, image_size: np.ndarray) -> dict:
    """The program's raw outputs (padded-input frame, all D slots, device arrays) for a
    preprocessed batch float32 `[batch_size, Hb, Wb, 3]` with content sizes int32
    `[batch_size, 2]`; (Hb, Wb) must be an exported bucket."""
    bucket = tuple(int(s) for s in np.shape(images)[1:3])
    if bucket not in self._calls:
      raise ValueError(f'{bucket} is not an exported bucket ({self.buckets})')
    return self._calls[bucket](self._weights, jnp.asarray(images, jnp.float32),
                               jnp.asarray(image_size, jnp.int32))

  def __call__(self, images: Union[np.ndarray, Sequence[np.ndarray]]):
    single = isinstance(images, np.ndarray) and images.ndim == 3
    images = [images] if single else list(images)
    prepared = [self.preprocess(im) for im in images]
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for idx, (_, _, bucket) in enumerate(prepared):
      by_bucket.setdefault(bucket, []).append(idx)
    results: list[Optional[dict]] = [None] * len(images)
    for bucket, indices in by_bucket.items():
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        batch = np.zeros((self.batch_size,) + bucket + (3,), np.float32)
        sizes = np.tile(np.array(bucket, np.int32), (self.batch_size, 1))
        for slot, idx in enumerate(chunk):
          batch[slot] = prepared[idx][0]
          sizes[slot] = prepared[idx][1]
        det = dict(self.detect(batch, sizes))
        host = [k for k, spec in self._outputs.items() if spec['postprocess'] != 'paste_masks']
        det.update(jax.device_get({k: det[k] for k in host}))
        for slot, idx in enumerate(chunk):
          results[idx] = self._finish(det, slot, images[idx].shape[:2], prepared[idx][1])
    return results[0] if single else results

  def _finish(self, det: dict, slot: int, original_hw, resized_hw) -> dict:
    valid = np.asarray(det['valid'][slot])
    clip = None
    if self._drop_empty:  # detectron2's detector_postprocess: clip, then drop empty boxes
      h, w = (np.float32(s) for s in original_hw)
      b = boxes_to_original(np.asarray(det['boxes'][slot]), original_hw, resized_hw)
      b[:, 0::2] = np.clip(b[:, 0::2], 0, w)
      b[:, 1::2] = np.clip(b[:, 1::2], 0, h)
      valid = valid & (b[:, 2] - b[:, 0] > 0) & (b[:, 3] - b[:, 1] > 0)
      clip = b
    out = {}
    for name, spec in self._outputs.items():
      kind = spec['postprocess']
      if kind == 'boxes_to_original':
        b = clip if clip is not None and name == 'boxes' else boxes_to_original(
            det[name][slot], original_hw, resized_hw)
        out[name] = b[valid]
      elif kind == 'keypoints_to_original':
        out[name] = keypoints_to_original(det[name][slot], original_hw, resized_hw)[valid]
      elif kind == 'valid_slots':
        out[name] = np.asarray(det[name][slot])[valid]
      elif kind == 'paste_masks':
        h, w = (int(s) for s in original_hw)
        m = self._canvas_multiple
        boxes = (clip if clip is not None else
                 boxes_to_original(np.asarray(det['boxes'][slot]), original_hw, resized_hw))
        pasted = _paste_binary(det[name][slot], jnp.asarray(boxes), math.ceil(h / m) * m,
                               math.ceil(w / m) * m, self._mask_thresh)
        out[name] = np.asarray(pasted)[valid, :h, :w]
      elif kind == 'per_image':
        out[name] = np.asarray(det[name][slot])
    if 'labels' in out:
      out['labels'] = out['labels'].astype(np.int32)
    return out


def load(directory: str, platform: Optional[str] = None) -> Runtime:
  """The Runtime of an export directory, for `platform` (default: JAX's default device's).

  Checked here, before anything runs, each failure an ExportFormatError naming the file: the
  manifest (`read_manifest`), that the directory holds this platform's programs, each file's
  SHA-256 against the manifest (a torn copy), each program's platform, and that the weights are
  exactly the programs' inputs (every missing, unexpected or misshaped one named).
  """
  manifest = read_manifest(directory)
  platform = platform or current_platform()
  if platform not in manifest.get('platforms', ()):
    raise ExportFormatError(
        f'{os.path.join(directory, MANIFEST)} holds programs for {manifest.get("platforms")}, '
        f'not for this {platform} device: export again with --platforms=...,{platform}')
  exported, inputs = {}, []
  for entry in manifest['artifacts']:
    if entry['platform'] != platform:
      continue
    path = os.path.join(directory, entry['file'])
    _check_digest(path, entry.get('sha256'))
    with open(path, 'rb') as f:
      data = f.read()
    try:
      program = jax.export.deserialize(bytearray(data))
    except Exception as e:  # flatbuffers and jax raise many types for a damaged file
      raise ExportFormatError(f'{path} is not a serialized jax.export program this jax reads '
                              f'({type(e).__name__}: {str(e)[:200]})') from e
    if tuple(program.platforms) != (platform,):
      raise ExportFormatError(f'{path} is a program for {program.platforms}, the manifest says '
                              f'{platform}')
    (weight_avals, _, _), _ = jax.tree_util.tree_unflatten(program.in_tree, program.in_avals)
    inputs.append(weight_avals)
    exported[tuple(int(s) for s in entry['bucket'])] = program
  if not exported:
    raise ExportFormatError(f'{os.path.join(directory, MANIFEST)} lists no {platform} program')
  weights_path = os.path.join(directory, WEIGHTS)
  with np.load(weights_path, allow_pickle=False) as f:
    weights = {name: f[name] for name in f.files}
  for weight_avals in inputs:
    _check_weights(directory, weights, weight_avals)
  _check_digest(weights_path, (manifest.get('weights') or {}).get('sha256'))
  return Runtime(directory, manifest, exported, weights, platform)


def _check_digest(path: str, want: Optional[str]) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing from its export directory')
  if want is not None and sha256_file(path) != want:
    raise ExportFormatError(f'{path} does not match the SHA-256 in its manifest: the file '
                            'changed after export (a torn copy or another export)')

