"""Restricted unpickler and torch-free .pth reader: payloads never run, arrays come back exact."""

import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest

from maskrcnn_jax.weights import safe_io

from tests.weights.golden_files import GOLDEN_NPZ, READER_PTH


class _SystemPayload:
  """Pickles as a call of os.system (a classic malicious checkpoint)."""

  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _ExecPayload:

  def __init__(self, code: str):
    self.code = code

  def __reduce__(self):
    return (exec, (self.code,))


def _marker_command(marker: pathlib.Path) -> str:
  return f'touch {marker}'


def test_plain_pickle_would_run_the_payload(tmp_path):
  """Control: the crafted bytes really execute their payload under plain `pickle.loads`."""
  marker = tmp_path / 'ran'
  data = pickle.dumps({'model': {'w': _SystemPayload(_marker_command(marker))}})
  pickle.loads(data)  # the unsafe way
  assert marker.exists()


@pytest.mark.parametrize('protocol', [0, 2, 4])
def test_restricted_unpickler_refuses_os_system_payload(tmp_path, protocol):
  marker = tmp_path / 'ran'
  path = tmp_path / 'evil.pkl'
  payload = {'model': {'backbone.w': np.ones(3, np.float32),
                       'evil': _SystemPayload(_marker_command(marker))},
             '__author__': 'x'}
  path.write_bytes(pickle.dumps(payload, protocol=protocol))
  with pytest.raises(safe_io.UnsafePickleError, match=r'(posix|nt)\.system'):
    safe_io.load_pickle(str(path))
  assert not marker.exists(), 'the payload ran'
  with pytest.raises(safe_io.UnsafePickleError):
    safe_io.load_state_dict(str(path))
  assert not marker.exists(), 'the payload ran'


def test_restricted_unpickler_refuses_exec_and_names_it(tmp_path):
  marker = tmp_path / 'ran'
  data = pickle.dumps([_ExecPayload(f'open({str(marker)!r}, "w").close()')], protocol=2)
  with pytest.raises(safe_io.UnsafePickleError, match=r'(__builtin__|builtins)\.exec'):
    safe_io.loads_pickle(data)
  assert not marker.exists()


def test_restricted_unpickler_refuses_object_arrays_and_other_reconstructs():
  with pytest.raises(safe_io.UnsafePickleError, match='object'):
    safe_io.loads_pickle(pickle.dumps(np.array([1, 'a'], dtype=object)))
  # _reconstruct of an ndarray subclass (arbitrary classes are not reachable anyway).
  with pytest.raises(safe_io.UnsafePickleError, match='recarray|numpy.rec'):
    safe_io.loads_pickle(pickle.dumps(np.rec.array([(1, 2.0)], dtype=[('a', 'i4'), ('b', 'f4')])))


@pytest.mark.parametrize('protocol', [0, 2, 3, 4, 5])
def test_restricted_unpickler_reads_arrays_exactly(protocol):
  rng = np.random.default_rng(0)
  obj = {'model': {'a': rng.normal(size=(3, 4)).astype(np.float32),
                   'b': np.arange(5, dtype=np.int64),
                   'c': np.asfortranarray(rng.normal(size=(2, 3))),
                   'd': np.float32(1.5)},
         '__author__': 'someone', 'matching_heuristics': True}
  out = safe_io.loads_pickle(pickle.dumps(obj, protocol=protocol))
  for k, v in obj['model'].items():
    np.testing.assert_array_equal(out['model'][k], v)
    assert np.asarray(out['model'][k]).dtype == np.asarray(v).dtype
  sd = safe_io.find_state_dict(out, 'x')
  assert sorted(sd) == ['a', 'b', 'c', 'd']


def test_find_state_dict_unwraps_caffe2_blobs_and_rejects_non_dicts():
  blobs = {'blobs': {'conv1_w': np.zeros((2, 3, 1, 1), np.float32)}}
  assert list(safe_io.find_state_dict(blobs, 'x')) == ['conv1_w']
  with pytest.raises(safe_io.WeightsFormatError, match='dict of arrays'):
    safe_io.find_state_dict([np.zeros(2)], 'x')


def test_torch_reader_matches_torch_values():
  """reader_cases.pth was written by torch.save; values recorded by make_golden.py."""
  expected = np.load(GOLDEN_NPZ)
  cases = safe_io.load_torch(str(READER_PTH), use_torch=False)
  names = [k[len('reader/'):] for k in expected.files if k.startswith('reader/')]
  assert sorted(cases) == sorted(names)
  for name in names:
    ref = expected[f'reader/{name}']
    got = cases[name]
    assert got.shape == ref.shape, name
    np.testing.assert_array_equal(np.asarray(got, ref.dtype), ref, err_msg=name)
  assert cases['int64'].dtype == np.int64 and cases['bool'].dtype == np.bool_
  assert cases['half'].dtype == np.float16


def test_torch_reader_refuses_payload_in_data_pkl(tmp_path):
  marker = tmp_path / 'ran'
  path = tmp_path / 'evil.pth'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', pickle.dumps({'w': _SystemPayload(_marker_command(marker))},
                                                 protocol=2))
  with pytest.raises(safe_io.UnsafePickleError, match='system'):
    safe_io.load_torch(str(path), use_torch=False)
  assert not marker.exists()


def test_torch_reader_legacy_format_needs_torch(tmp_path):
  path = tmp_path / 'legacy.pth'
  path.write_bytes(b'\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.')  # pre-1.6 magic number
  with pytest.raises(safe_io.WeightsFormatError, match='legacy.*needs torch'):
    safe_io.load_torch(str(path), use_torch=False)


@pytest.mark.parametrize('seed', range(8))
def test_random_bytes_pickle_is_one_error_naming_the_file(tmp_path, seed):
  path = tmp_path / f'random{seed}.pkl'
  path.write_bytes(np.random.default_rng(seed).integers(0, 256, 256, dtype=np.uint8).tobytes())
  with pytest.raises((safe_io.WeightsFormatError, safe_io.UnsafePickleError)) as e:
    safe_io.load_state_dict(str(path))
  assert str(e.value).startswith(str(path))


def test_damaged_pickles_name_the_file(tmp_path):
  good = pickle.dumps({'w': np.arange(6, dtype=np.float32)}, protocol=2)
  cases = {'invalid_key.pkl': b'\xff' + good[1:], 'truncated.pkl': good[:len(good) // 2],
           'empty.pkl': b''}
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
    with pytest.raises(safe_io.WeightsFormatError, match='not a pickle of numpy arrays') as e:
      safe_io.load_pickle(str(tmp_path / name))
    assert str(e.value).startswith(str(tmp_path / name)), name
  # A refused numpy construct raised outside find_class also names the source.
  with pytest.raises(safe_io.UnsafePickleError, match=r'^w\.pkl: .*object'):
    safe_io.loads_pickle(pickle.dumps(np.array([1, 'a'], dtype=object)), source='w.pkl')


def test_torch_zip_with_damaged_data_pkl_names_the_file(tmp_path):
  path = tmp_path / 'damaged.pth'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', b'\x80\x02garbage')
  with pytest.raises(safe_io.WeightsFormatError, match='damaged.pth'):
    safe_io.load_torch(str(path), use_torch=False)


def test_npz_errors_name_the_file(tmp_path):
  obj = tmp_path / 'objects.npz'
  np.savez(obj, w=np.zeros(3, np.float32), names=np.array([{'a': 1}], dtype=object))
  with pytest.raises(safe_io.WeightsFormatError, match=r"objects\.npz: array 'names' is an "
                     'object array'):
    safe_io.load_state_dict(str(obj))
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'this is not a zip archive' * 4)
  with pytest.raises(safe_io.WeightsFormatError, match=r'garbage\.npz: not a readable \.npz'):
    safe_io.load_state_dict(str(garbage))
  single = tmp_path / 'single.npz'
  with open(single, 'wb') as f:
    np.save(f, np.zeros(2))  # an .npy under an .npz name
  with pytest.raises(safe_io.WeightsFormatError, match=r'single\.npz: holds a single array'):
    safe_io.load_state_dict(str(single))
  good = tmp_path / 'good.npz'
  np.savez(good, w=np.arange(4, dtype=np.int32))
  np.testing.assert_array_equal(safe_io.load_state_dict(str(good))['w'], np.arange(4))
