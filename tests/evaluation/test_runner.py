"""The evaluation runner (`maskrcnn_jax/evaluate.py`): a predictor over records, metrics,
results, pictures and summaries written out (with the COCO fixtures of this folder)."""
import json

import numpy as np
from PIL import Image
import pytest

from maskrcnn_jax import evaluate
from maskrcnn_jax.data import coco
from maskrcnn_jax.evaluation import coco_eval


class _FakePredictor:
  """Looks the answer up by image content; records the batch sizes it was called with."""

  def __init__(self, tiny_coco, predictions=None):
    predictions = tiny_coco.predictions if predictions is None else predictions
    self.by_bytes = {tiny_coco.images[i].tobytes(): p for i, p in predictions.items()}
    self.batch_sizes = []

  def __call__(self, images):
    self.batch_sizes.append(len(images))
    return [self.by_bytes[np.asarray(im).tobytes()] for im in images]


class _FakeWriter:

  def __init__(self):
    self.scalars, self.images, self.flushed = {}, {}, False

  def add_scalar(self, tag, value, step):
    self.scalars[tag] = (value, step)

  def add_image(self, tag, image, step, dataformats):
    assert dataformats == 'HWC'
    self.images[tag] = (image.shape, step)

  def flush(self):
    self.flushed = True


def test_evaluate_with_fake_predictor(tiny_coco, tmp_path):
  predictor = _FakePredictor(tiny_coco)
  records = [(i, tiny_coco.images[i]) for i in (11, 12, 13)]
  writer = _FakeWriter()
  out = tmp_path / 'eval'
  metrics = evaluate.evaluate(predictor, iter(records), tiny_coco.path,
                               tiny_coco.label_to_category_id, out, num_pictures=2, step=7,
                               summary_writer=writer, batch_size=2)
  assert predictor.batch_sizes == [2, 1]
  assert metrics['bbox/AP'] == pytest.approx(1.0)
  assert metrics['segm/AP'] == pytest.approx(1.0)
  assert len(json.loads((out / 'results.json').read_text())) == 6
  saved = json.loads((out / 'metrics.json').read_text())
  assert saved['step'] == 7 and saved['num_images'] == 3
  assert saved['metrics'] == pytest.approx(metrics)
  assert sorted(p.name for p in (out / 'pictures').iterdir()) == ['11.png', '12.png']
  assert writer.scalars['eval/segm/AP'] == (pytest.approx(1.0), 7)
  assert len(writer.scalars) == 24 and writer.flushed
  assert writer.images['eval/pictures/12'] == ((80, 90, 3), 7)


def test_evaluate_dict_records_without_masks_and_empty_image(tiny_coco, tmp_path):
  predictions = {i: {k: v for k, v in p.items() if k != 'masks'}
                 for i, p in tiny_coco.predictions.items()}
  predictions[13] = {'boxes': np.zeros((0, 4), np.float32), 'scores': np.zeros(0, np.float32),
                     'labels': np.zeros(0, np.int32)}
  records = [{'image_id': i, 'image': tiny_coco.images[i]} for i in (11, 12, 13)]
  metrics = evaluate.evaluate(_FakePredictor(tiny_coco, predictions), records, tiny_coco.coco,
                               tiny_coco.label_to_category_id, tmp_path, num_pictures=0)
  assert set(metrics) == {f'bbox/{n}' for n in coco_eval.METRIC_NAMES}  # no masks, no segm
  assert metrics['bbox/AP50'] < 1.0  # image 13's two instances were missed
  assert not (tmp_path / 'pictures').exists()


def test_evaluate_no_detections_at_all(tiny_coco, tmp_path):
  h_w = {i: im.shape[:2] for i, im in tiny_coco.images.items()}
  predictions = {i: {'boxes': np.zeros((0, 4), np.float32), 'scores': np.zeros(0, np.float32),
                     'labels': np.zeros(0, np.int32), 'masks': np.zeros((0, *h_w[i]), bool)}
                 for i in h_w}
  records = [(i, tiny_coco.images[i]) for i in (11, 12, 13)]
  metrics = evaluate.evaluate(_FakePredictor(tiny_coco, predictions), records, tiny_coco.path,
                               tiny_coco.label_to_category_id, tmp_path, num_pictures=1)
  assert metrics['bbox/AP'] == 0.0 and metrics['segm/AP'] == 0.0
  assert json.loads((tmp_path / 'results.json').read_text()) == []
  assert (tmp_path / 'pictures' / '11.png').exists()


def test_evaluate_logs_to_tensorboardx(tiny_coco, tmp_path):
  tensorboardx = pytest.importorskip('tensorboardX')
  writer = tensorboardx.SummaryWriter(str(tmp_path / 'tb'))
  records = [(i, tiny_coco.images[i]) for i in (11, 12, 13)]
  evaluate.evaluate(_FakePredictor(tiny_coco), records, tiny_coco.path,
                     tiny_coco.label_to_category_id, tmp_path / 'eval', num_pictures=1, step=3,
                     summary_writer=writer)
  writer.close()
  events = list((tmp_path / 'tb').glob('events.out.tfevents.*'))
  assert len(events) == 1 and events[0].stat().st_size > 0


def test_evaluate_coco_reader_records_and_label_map(tiny_coco, tmp_path):
  for image_id, info in tiny_coco.coco.imgs.items():
    Image.fromarray(tiny_coco.images[image_id]).save(tmp_path / info['file_name'])
  dataset = coco.load_coco(tiny_coco.path, str(tmp_path))
  assert coco_eval.as_label_to_category_id(dataset.label_map) == tiny_coco.label_to_category_id
  metrics = evaluate.evaluate(_FakePredictor(tiny_coco), dataset.records, tiny_coco.path,
                               dataset.label_map, tmp_path / 'eval', num_pictures=0)
  assert metrics['bbox/AP'] == pytest.approx(1.0) and metrics['segm/AP'] == pytest.approx(1.0)
