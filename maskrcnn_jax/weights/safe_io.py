"""Reading other codebases' checkpoint files without running code from them.

Pickle files (detectron2 `.pkl`, Caffe2/MSRA `.pkl`) go through `RestrictedUnpickler`, which
admits only numpy array reconstruction and plain containers: any other global a pickle names is
refused with `UnsafePickleError` naming it, before anything is called. PyTorch `.pth` files are
read with `torch.load(weights_only=True)` when torch is installed, otherwise by a built-in reader
of torch's zip format that uses the same restricted unpickler (tensors only, no torch needed).
"""

import codecs
import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

Array = np.ndarray


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle names a global that is not on the allow-list (nothing from it was called)."""


class WeightsFormatError(ValueError):
  """A checkpoint file cannot be read as a dict of arrays; names the file."""


# ------------------------------------------------------------------------------ allow-list


def _reconstruct(cls, shape, dtype):
  """numpy's `_reconstruct` for plain ndarrays only (pickled arrays start from it)."""
  if cls is not np.ndarray:
    raise UnsafePickleError(f'numpy _reconstruct of {cls!r} refused: only numpy.ndarray is allowed')
  return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype))


def _dtype(*args):
  """`numpy.dtype(...)` refusing object dtypes (whose items would be arbitrary objects)."""
  dtype = np.dtype(*args)
  if dtype.hasobject:
    raise UnsafePickleError(f'numpy dtype {dtype} refused: object arrays are not allowed')
  return dtype


def _scalar(dtype, data=None):
  """numpy's pickled scalar constructor, numeric dtypes only."""
  dtype = _dtype(dtype)
  if not isinstance(data, (bytes, str)):
    raise UnsafePickleError('numpy scalar with non-bytes payload refused')
  if isinstance(data, str):  # a Python-2 str decoded with encoding='latin1'
    data = data.encode('latin1')
  return np.frombuffer(data, dtype=dtype, count=1)[0]


def _frombuffer(buffer, dtype, shape, order):
  """numpy's protocol-5 array constructor (a copy, so the pickle's buffer is not kept)."""
  if order not in ('C', 'F'):
    raise UnsafePickleError(f'numpy _frombuffer order {order!r} refused')
  return np.frombuffer(buffer, dtype=_dtype(dtype)).reshape(shape, order=order).copy()


def _latin1_encode(text, encoding='latin1', errors='strict'):
  """`_codecs.encode` as protocol-2 pickles use it for bytes objects; latin-1 only."""
  if codecs.lookup(encoding).name != 'iso8859-1' or not isinstance(text, str):
    raise UnsafePickleError(f'_codecs.encode with encoding {encoding!r} refused')
  return text.encode('latin1', errors)


# (module, name) -> the object `find_class` returns. numpy 1.x pickles say `numpy.core`, numpy 2.x
# `numpy._core`; Python 2 pickles say `__builtin__`/`copy_reg` (mapped by fix_imports).
_NUMPY_GLOBALS: dict[tuple[str, str], Any] = {
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): _dtype,
    ('_codecs', 'encode'): _latin1_encode,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}
for _core in ('numpy.core.multiarray', 'numpy._core.multiarray'):
  _NUMPY_GLOBALS[(_core, '_reconstruct')] = _reconstruct
  _NUMPY_GLOBALS[(_core, 'scalar')] = _scalar
for _core in ('numpy.core.numeric', 'numpy._core.numeric'):
  _NUMPY_GLOBALS[(_core, '_frombuffer')] = _frombuffer

_SCALAR_TYPES = (str, bytes, int, float, bool, complex, type(None), np.generic)


class RestrictedUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` whose `find_class` admits only `allowed` globals.

  Every way a pickle can reach a callable (GLOBAL/STACK_GLOBAL/INST/OBJ/extension codes) goes
  through `find_class`, so a payload such as `os.system` is refused before it can run.
  """

  def __init__(self, file, *, source: str = '<pickle>',
               allowed: dict[tuple[str, str], Any] | None = None, **kwargs):
    kwargs.setdefault('encoding', 'latin1')  # Python-2 (Caffe2 / Detectron) pickles
    super().__init__(file, **kwargs)
    self._source = source
    self._allowed = dict(_NUMPY_GLOBALS if allowed is None else allowed)

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f'{self._source}: refusing to load global {module}.{name}: only numpy arrays and plain '
          'containers may appear in a weights file (nothing from it was executed)') from None

  def persistent_load(self, pid: Any) -> Any:
    raise UnsafePickleError(f'{self._source}: persistent id {pid!r} refused')


def _check_plain(obj: Any, source: str, path: str = '') -> None:
  """Raises unless `obj` is made of dict/list/tuple/set, non-object ndarrays and scalars."""
  if isinstance(obj, dict):
    for k, v in obj.items():
      _check_plain(k, source, path)
      _check_plain(v, source, f'{path}/{k}')
  elif isinstance(obj, (list, tuple, set, frozenset)):
    for i, v in enumerate(obj):
      _check_plain(v, source, f'{path}[{i}]')
  elif isinstance(obj, np.ndarray):
    if obj.dtype.hasobject:
      raise UnsafePickleError(f'{source}: object array at {path or "/"} refused')
  elif not isinstance(obj, _SCALAR_TYPES):
    raise UnsafePickleError(f'{source}: unexpected {type(obj).__name__} at {path or "/"}')


def _restricted_load(unpickler: RestrictedUnpickler, source: str) -> Any:
  """`unpickler.load()` whose every failure is one error naming `source`.

  A refused global stays an `UnsafePickleError`; anything else a damaged or foreign file makes
  the unpickler raise (`invalid load key`, EOFError, a bad memo index...) becomes a
  `WeightsFormatError`. Catching broadly is safe: nothing outside the allow-list can have run.
  """
  try:
    return unpickler.load()
  except (UnsafePickleError, WeightsFormatError) as e:
    if str(e).startswith(source):
      raise
    raise type(e)(f'{source}: {e}') from e
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsFormatError(f'{source}: not a pickle of numpy arrays (damaged, truncated or '
                             f'another format: {type(e).__name__}: {e})') from e


def load_pickle(path: str) -> Any:
  """Loads a pickle of numpy arrays and containers with `RestrictedUnpickler`."""
  with open(path, 'rb') as f:
    return loads_pickle(f.read(), source=path)


def loads_pickle(data: bytes, source: str = '<bytes>') -> Any:
  """Raises UnsafePickleError (refused content) or WeightsFormatError, naming `source`."""
  obj = _restricted_load(RestrictedUnpickler(io.BytesIO(data), source=source), source)
  _check_plain(obj, source)
  return obj


# ------------------------------------------------------------------------------ torch files


def _torch_dtypes() -> dict[str, Any]:
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (a jax dependency)
  return {
      'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
      'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
      'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
      'BoolStorage': np.bool_,
  }


class _StorageType:
  """Stands in for `torch.FloatStorage` & co. while reading a torch zip file."""

  def __init__(self, name: str, dtype: Any):
    self.name, self.dtype = name, np.dtype(dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, np.ndarray):
    raise UnsafePickleError('tensor storage is not an array')
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if any(s < 0 for s in stride):
    raise WeightsFormatError('negative tensor strides are not supported')
  extent = 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
  if storage_offset < 0 or storage_offset + extent > storage.size:
    raise WeightsFormatError('tensor view reaches outside its storage')
  base = storage[storage_offset:]
  item = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(base, size, [s * item for s in stride]).copy()


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


class _TorchZipUnpickler(RestrictedUnpickler):
  """Reads `data.pkl` of a torch zip checkpoint: tensors become numpy arrays."""

  def __init__(self, file, zf: zipfile.ZipFile, prefix: str, source: str):
    allowed = dict(_NUMPY_GLOBALS)
    allowed[('torch._utils', '_rebuild_tensor_v2')] = _rebuild_tensor_v2
    allowed[('torch._utils', '_rebuild_parameter')] = _rebuild_parameter
    for name, dtype in _torch_dtypes().items():
      allowed[('torch', name)] = _StorageType(name, dtype)
    super().__init__(file, source=source, allowed=allowed, encoding='utf-8')
    self._zf, self._prefix = zf, prefix
    self._storages: dict[str, np.ndarray] = {}
    byteorder = f'{prefix}/byteorder'
    self._big_endian = (byteorder in zf.namelist() and
                        zf.read(byteorder).decode().strip() == 'big')

  def persistent_load(self, pid: Any) -> Any:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise UnsafePickleError(f'{self._source}: persistent id {pid!r} refused')
    _, storage_type, key, _, numel = pid
    key = str(key)
    if key not in self._storages:
      raw = self._zf.read(f'{self._prefix}/data/{key}')
      dtype = storage_type.dtype.newbyteorder('>' if self._big_endian else '<')
      arr = np.frombuffer(raw, dtype=dtype)
      if arr.size < int(numel):
        raise WeightsFormatError(f'{self._source}: storage {key} is truncated')
      self._storages[key] = arr.astype(storage_type.dtype)
    return self._storages[key]


def _read_torch_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    pkls = [n for n in zf.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pkls) != 1:
      raise WeightsFormatError(f'{path}: not a torch zip checkpoint (no unique */data.pkl)')
    prefix = pkls[0].split('/')[0]
    obj = _restricted_load(_TorchZipUnpickler(io.BytesIO(zf.read(pkls[0])), zf, prefix, path),
                           path)
  _check_plain(obj, path)
  return obj


def _torch_to_numpy(obj: Any) -> Any:
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    if t.dtype == torch.bfloat16:
      t = t.float()
    return t.numpy()
  if isinstance(obj, dict):
    return {k: _torch_to_numpy(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_torch_to_numpy(v) for v in obj)
  return obj


def load_torch(path: str, *, use_torch: bool | None = None) -> Any:
  """Contents of a `.pth`/`.pt` file with every tensor as a numpy array.

  With torch installed (`use_torch` None or True): `torch.load(path, map_location='cpu',
  weights_only=True)`. Without it: the built-in restricted reader of torch's zip format
  (torch >= 1.6 files); the pre-1.6 legacy format then needs torch and raises a clear error.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no such checkpoint file: {path}')
  if use_torch is None:
    import importlib.util  # pylint: disable=g-import-not-at-top
    use_torch = importlib.util.find_spec('torch') is not None
  if use_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("reading with torch needs it: pip install 'maskrcnn_jax[torch]'") from e
    return _torch_to_numpy(torch.load(path, map_location='cpu', weights_only=True))
  if not zipfile.is_zipfile(path):
    raise WeightsFormatError(
        f'{path} is in the legacy (pre-1.6) torch format, which needs torch to read: '
        "pip install 'maskrcnn_jax[torch]' (or re-save it with torch >= 1.6)")
  return _read_torch_zip(path)


def find_state_dict(obj: Any, source: str,
                    wrappers: tuple[str, ...] = ('model', 'state_dict', 'blobs')
                    ) -> dict[str, Array]:
  """The `{name: array}` dict inside a loaded checkpoint (unwrapping e.g. `{'model': {...}}`)."""
  while isinstance(obj, dict):
    if obj and all(isinstance(v, (np.ndarray, np.generic)) for v in obj.values()):
      return {str(k): np.asarray(v) for k, v in obj.items()}
    inner = [w for w in wrappers if isinstance(obj.get(w), dict)]
    if not inner:
      break
    obj = obj[inner[0]]
  raise WeightsFormatError(
      f'{source}: expected a dict of arrays (optionally under one of {wrappers}), got '
      f'{type(obj).__name__}' + (f' with keys {sorted(map(str, obj))[:10]}'
                                 if isinstance(obj, dict) else ''))


def load_state_dict(path: str) -> dict[str, Array]:
  """`{name: ndarray}` from a `.pth`/`.pt` (torch), `.pkl` (detectron2/Caffe2) or `.npz` file."""
  ext = os.path.splitext(path)[1].lower()
  if ext in ('.pkl', '.pickle'):
    return find_state_dict(load_pickle(path), path)
  if ext == '.npz':
    return _load_npz(path)
  return find_state_dict(load_torch(path), path)


def _load_npz(path: str) -> dict[str, Array]:
  """{name: array} of an .npz; object arrays (which would need pickle) are refused by name."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no such checkpoint file: {path}')
  try:
    z = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise WeightsFormatError(f'{path}: not a readable .npz file ({e})') from e
  if not isinstance(z, np.lib.npyio.NpzFile):
    raise WeightsFormatError(f'{path}: holds a single array, not an .npz archive of named '
                             'arrays')
  out = {}
  with z:
    for k in z.files:
      try:
        out[k] = z[k]
      except ValueError as e:  # 'Object arrays cannot be loaded when allow_pickle=False'
        raise WeightsFormatError(f'{path}: array {k!r} is an object array, refused (loading it '
                                 'would unpickle arbitrary objects); save plain numeric '
                                 'arrays') from e
      except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise WeightsFormatError(f'{path}: array {k!r} cannot be read ({e})') from e
  return out
