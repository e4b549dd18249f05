"""Shared machinery of the converters: name mapping, layout transforms, strict key checks.

A converter is a function from one of our variable paths, e.g.
`('params', 'backbone', 'body', 'layer1', '0', 'conv1', 'kernel')`, to a `Source` (the source
tensor's name and how to turn it into our layout) or a `Fill` (a constant the source format
does not store, e.g. the running statistics of Caffe2's folded batch norm). `assign` applies it
to every variable of the model built from a config and refuses to guess: missing source names,
unused source names and shape mismatches are all collected and raised together, by name.
"""

import dataclasses
import functools
import logging
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import ml_collections
import numpy as np

Array = np.ndarray
Path = tuple[str, ...]

# Our class-specific layers (their leading/trailing class axis depends on num_classes).
CLASS_SPECIFIC_MODULES = (
    ('roi_heads', 'box_predictor', 'cls_score'),
    ('roi_heads', 'box_predictor', 'bbox_pred'),
    ('roi_heads', 'mask_predictor', 'mask_fcn_logits'),
)
# Our transposed convolutions (flax ConvTranspose(transpose_kernel=True), kernel [kh, kw, out, in]).
TRANSPOSED_CONV_MODULES = ('conv5_mask', 'kps_score_lowres')


class WeightsMismatchError(ValueError):
  """The source weights do not fit the model built from the config; lists every offending name."""


class ClassCountMismatchError(WeightsMismatchError):
  """The source and the config disagree on the number of classes (see allow_class_mismatch)."""


# ------------------------------------------------------------------------------ layouts


def conv_kernel(w: Array) -> Array:
  """torch/Caffe2 conv weight `[out, in, kh, kw]` -> flax `[kh, kw, in, out]`."""
  _expect_ndim(w, 4, 'conv weight')
  return np.transpose(w, (2, 3, 1, 0))


def conv_transpose_kernel(w: Array) -> Array:
  """torch ConvTranspose2d weight `[in, out, kh, kw]` -> flax `ConvTranspose(transpose_kernel=
  True)` kernel `[kh, kw, out, in]` (flax then flips the spatial axes and swaps in/out, which is
  exactly torch's transposed-convolution arithmetic)."""
  _expect_ndim(w, 4, 'transposed-conv weight')
  return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: Array) -> Array:
  """torch Linear weight `[out, in]` -> flax Dense kernel `[in, out]`."""
  _expect_ndim(w, 2, 'linear weight')
  return np.transpose(w)


def _expect_ndim(w: Array, ndim: int, what: str) -> None:
  if w.ndim != ndim:
    raise ValueError(f'{what} must have {ndim} dimensions, got shape {w.shape}')


def default_layout(path: Path) -> Callable[[Array], Array]:
  """The layout transform for our variable `path` (by leaf name, rank and module)."""
  if path[-1] != 'kernel':
    return lambda w: w
  if path[-2] in TRANSPOSED_CONV_MODULES:
    return conv_transpose_kernel
  return lambda w: conv_kernel(w) if w.ndim == 4 else dense_kernel(w)


# ------------------------------------------------------------------------------ mapping rules


@dataclasses.dataclass(frozen=True)
class Source:
  """Our variable comes from source tensor `name` through `transform` (our layout)."""
  name: str
  transform: Callable[[Array], Array]


@dataclasses.dataclass(frozen=True)
class Fill:
  """Our variable is the constant `value` (the source format does not store it)."""
  value: float
  why: str


Rule = Union[Source, Fill]
NameFn = Callable[[Path], Optional[Rule]]


def is_class_specific(path: Path) -> bool:
  return path[1:4] in CLASS_SPECIFIC_MODULES


def flatten(tree: Mapping) -> dict[Path, Any]:
  """`{'params': {'a': {'kernel': x}}}` -> `{('params', 'a', 'kernel'): x}`."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update({(str(k),) + p: x for p, x in flatten(v).items()})
    else:
      out[(str(k),)] = v
  return out


def unflatten(flat: Mapping[Path, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def path_str(path: Path) -> str:
  return '/'.join(path)


def abstract_variables(config: ml_collections.ConfigDict) -> dict[Path, jax.ShapeDtypeStruct]:
  """Shapes of every variable of the model built from `config` (nothing is allocated)."""
  from maskrcnn_jax.modeling import mask_rcnn  # pylint: disable=g-import-not-at-top
  tree = jax.eval_shape(functools.partial(mask_rcnn.init_variables, config), jax.random.key(0))
  return flatten(tree)


def init_variables_flat(config: ml_collections.ConfigDict, key: jax.Array) -> dict[Path, Array]:
  from maskrcnn_jax.modeling import mask_rcnn  # pylint: disable=g-import-not-at-top
  return {p: np.asarray(v) for p, v in flatten(mask_rcnn.init_variables(config, key)).items()}


def to_numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Array]:
  """`{name: ndarray}` from numpy arrays or torch tensors (bf16/fp16 become float32)."""
  out = {}
  for k, v in state_dict.items():
    if hasattr(v, 'detach'):  # a torch tensor, without importing torch
      v = v.detach().cpu()
      v = v.float() if v.is_floating_point() else v
      v = v.numpy()
    v = np.asarray(v)
    if v.dtype.kind == 'f' or v.dtype.name == 'bfloat16':
      v = v.astype(np.float32)
    out[str(k)] = v
  return out


def assign(state_dict: Mapping[str, Array], targets: Mapping[Path, jax.ShapeDtypeStruct],
           name_fn: NameFn, *, source: str, ignore: Callable[[str], bool] = lambda k: False,
           allow_class_mismatch: bool = False, class_count: Optional[int] = None,
           num_classes: Optional[int] = None, init_fn: Optional[Callable[[], Mapping]] = None,
           ) -> dict[Path, Array]:
  """Builds our variables `targets` from `state_dict` through `name_fn`, strictly.

  Args:
    state_dict: `{source name: ndarray}`.
    targets: our flat variable paths -> ShapeDtypeStruct (from `abstract_variables`).
    name_fn: our path -> `Source` / `Fill`, or None when the converter has no rule (an error).
    source: a description of the source for messages ('torchvision checkpoint x.pth').
    ignore: source names deliberately unused (e.g. an ImageNet classifier's `fc.*`).
    allow_class_mismatch: with `class_count != num_classes`, re-initialise the class-specific
      layers from `init_fn()` instead of raising `ClassCountMismatchError`.
    class_count, num_classes: the source's and the config's `K + 1` (None: not checked).
    init_fn: returns our freshly initialised flat variables (called only when needed).

  Returns:
    Our flat variables: float32 numpy arrays for every path of `targets`.

  Raises:
    WeightsMismatchError: listing every missing source name, unused source name and shape
      mismatch (never a partial load).
    ClassCountMismatchError: the class counts differ and `allow_class_mismatch` is False.
  """
  rules, no_rule = {}, []
  for path in targets:
    rule = name_fn(path)
    if rule is None:
      no_rule.append(path)
    else:
      rules[path] = rule
  used = {r.name for r in rules.values() if isinstance(r, Source)}
  missing = sorted(f'{r.name} (for {path_str(p)})' for p, r in rules.items()
                   if isinstance(r, Source) and r.name not in state_dict)
  ignored = sorted(k for k in state_dict if k not in used and ignore(k))
  unexpected = sorted(k for k in state_dict if k not in used and not ignore(k))
  class_mismatch = (class_count is not None and num_classes is not None
                    and class_count != num_classes)
  problems = []
  if no_rule:
    problems.append(f'{len(no_rule)} model variables have no source rule (unsupported model '
                    f'option for this converter): ' + ', '.join(map(path_str, no_rule)))
  if missing:
    problems.append(f'{len(missing)} tensors missing from the source: ' + ', '.join(missing))
  if unexpected:
    problems.append(f'{len(unexpected)} source tensors not used by the model built from the '
                    f'config: ' + ', '.join(unexpected))
  if problems:
    raise WeightsMismatchError(f'{source} does not match the model: ' + '; '.join(problems))

  flat, wrong_shape, class_paths = {}, [], []
  for path, target in targets.items():
    rule = rules[path]
    if isinstance(rule, Fill):
      flat[path] = np.full(target.shape, rule.value, np.float32)
      continue
    value = np.asarray(rule.transform(np.asarray(state_dict[rule.name])), np.float32)
    if is_class_specific(path) and class_mismatch:
      class_paths.append(path)
      continue
    if value.shape != tuple(target.shape):
      wrong_shape.append(f'{rule.name} -> {path_str(path)}: source {value.shape} (our layout) vs '
                         f'model {tuple(target.shape)}')
      continue
    flat[path] = value
  if wrong_shape:
    raise WeightsMismatchError(f'{source}: {len(wrong_shape)} shape mismatches: '
                               + '; '.join(wrong_shape))
  if class_mismatch and not allow_class_mismatch:
    raise ClassCountMismatchError(
        f'{source} has {class_count} classes (incl. background) but config.model.num_classes = '
        f'{num_classes}; pass allow_class_mismatch=True (CLI: --allow_class_mismatch) to '
        f're-initialise the class-specific layers ' + ', '.join(map(path_str, class_paths)))
  if class_paths:
    fresh = init_fn()
    for path in class_paths:
      flat[path] = np.asarray(fresh[path], np.float32)
    logging.warning('%s: %d classes vs config %d: re-initialised the class-specific layers %s',
                    source, class_count, num_classes, ', '.join(map(path_str, class_paths)))
  if ignored:
    logging.info('%s: ignored %d tensors not used by Mask R-CNN: %s', source, len(ignored),
                 ', '.join(ignored))
  return flat


def rename_keys(state_dict: Mapping[str, Array],
                rules: Sequence[tuple[Any, Callable[[Any], str]]]) -> dict[str, Array]:
  """Applies the first matching `(compiled regex, match -> new name)` rule to each key.

  Raises WeightsMismatchError if two keys end up with the same name (e.g. a file holding both
  the legacy and the current name of one tensor).
  """
  out, origin = {}, {}
  for k, v in state_dict.items():
    new = k
    for pattern, fn in rules:
      m = pattern.fullmatch(k)
      if m:
        new = fn(m)
        break
    if new in out:
      raise WeightsMismatchError(f'source tensors {origin[new]} and {k} both map to {new}')
    out[new], origin[new] = v, k
  return out


# ------------------------------------------------------------------------------ input statistics


@dataclasses.dataclass(frozen=True)
class InputNorm:
  """The pixel normalisation a set of weights expects: channel order and 0..255 mean/std."""
  channel_order: str
  pixel_mean: tuple[float, float, float]
  pixel_std: tuple[float, float, float]

  @classmethod
  def of_config(cls, config: ml_collections.ConfigDict) -> 'InputNorm':
    i = config.input
    return cls(str(i.channel_order), tuple(map(float, i.pixel_mean)),
               tuple(map(float, i.pixel_std)))

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  def close_to(self, other: 'InputNorm') -> bool:
    return (self.channel_order == other.channel_order
            and np.allclose(self.pixel_mean, other.pixel_mean, atol=1e-3)
            and np.allclose(self.pixel_std, other.pixel_std, atol=1e-3))


def adapt_stem_to_input(flat: dict[Path, Array], prefix: Path, weights_norm: InputNorm,
                        config_norm: InputNorm) -> None:
  """Rewrites the stem so that weights trained on `weights_norm` inputs accept `config_norm`.

  The stem conv is linear in its input: with our normalised pixels `x_c` and the weights'
  expected `x_s[j] = a[j] * x_c[perm[j]] + d[j]`, the conv kernel is permuted and scaled by `a`,
  and the constant `conv(d)` is folded into the stem batch norm's running mean (or the conv bias
  with `norm='none'`). Exact when both normalisations have the same mean pixel (ImageNet RGB
  and Caffe BGR statistics do); otherwise outputs within the stem conv's 3-pixel zero-padding
  border differ, since zero padding means "the mean pixel" of each. Modifies `flat` in place.

  Args:
    flat: our flat variables; `prefix` + ('conv1', 'kernel') etc. must exist.
    prefix: the ResNet body path without the collection, e.g. ('backbone', 'body').
  """
  perm = [0, 1, 2] if weights_norm.channel_order == config_norm.channel_order else [2, 1, 0]
  mean_c, std_c = np.asarray(config_norm.pixel_mean), np.asarray(config_norm.pixel_std)
  mean_s, std_s = np.asarray(weights_norm.pixel_mean), np.asarray(weights_norm.pixel_std)
  a = std_c[perm] / std_s
  d = (mean_c[perm] - mean_s) / std_s
  kpath = ('params',) + prefix + ('conv1', 'kernel')
  kernel = flat[kpath]  # [kh, kw, in (weights' channel order), out]
  offset = np.einsum('hwio,i->o', kernel.astype(np.float64), d)
  new_kernel = np.empty_like(kernel)
  for j in range(3):
    new_kernel[:, :, perm[j], :] = kernel[:, :, j, :] * a[j]
  flat[kpath] = new_kernel.astype(np.float32)
  mean_path = ('constants',) + prefix + ('bn1', 'running_mean')
  bias_path = ('params',) + prefix + ('conv1', 'bias')
  if mean_path in flat:
    flat[mean_path] = (flat[mean_path] - offset).astype(np.float32)
  elif bias_path in flat:
    flat[bias_path] = (flat[bias_path] + offset).astype(np.float32)
  else:
    raise WeightsMismatchError(f'cannot fold the input offset: neither {path_str(mean_path)} '
                               f'nor {path_str(bias_path)} exists')
  logging.warning('adapted the stem conv of weights expecting %s input to the config\'s %s%s',
                  weights_norm, config_norm,
                  '' if np.allclose(mean_c[perm], mean_s) else
                  ' (not exact within the 3-pixel padding border: the mean pixels differ)')


def warn_input_norm(source: str, weights_norm: InputNorm, config: ml_collections.ConfigDict
                    ) -> None:
  config_norm = InputNorm.of_config(config)
  if not weights_norm.close_to(config_norm):
    logging.warning('%s expects %s input but config.input has %s: outputs will be off unless '
                    'the config matches (use the converter\'s preset config)', source,
                    weights_norm, config_norm)
