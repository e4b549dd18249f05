"""Converters from torchvision and detectron2 checkpoints to our variables, and safe file I/O.

    variables = weights.from_torchvision(state_dict, config)     # numpy state dict or tensors
    variables = weights.from_detectron2(state_dict, config)
    weights.convert_file('torchvision', 'model.pth', 'out_dir', config)   # `maskrcnn-jax convert`
    params, constants = weights.load_pretrained_backbone(path, params, constants, config)

Nothing is loaded partially: missing, unused or misshaped tensors raise `WeightsMismatchError`
listing them by name; a class-count difference raises `ClassCountMismatchError` unless
`allow_class_mismatch=True`. Pickles are read by a restricted unpickler that never runs code.
"""

from maskrcnn_jax.weights.convert import convert_file
from maskrcnn_jax.weights.convert import convert_variables
from maskrcnn_jax.weights.convert import load_pretrained_backbone
from maskrcnn_jax.weights.core import ClassCountMismatchError
from maskrcnn_jax.weights.core import WeightsMismatchError
from maskrcnn_jax.weights.detectron2 import from_detectron2
from maskrcnn_jax.weights.safe_io import UnsafePickleError
from maskrcnn_jax.weights.safe_io import WeightsFormatError
from maskrcnn_jax.weights.safe_io import load_pickle
from maskrcnn_jax.weights.safe_io import load_state_dict
from maskrcnn_jax.weights.torchvision import from_torchvision

__all__ = [
    'ClassCountMismatchError', 'UnsafePickleError', 'WeightsFormatError', 'WeightsMismatchError',
    'convert_file', 'convert_variables', 'from_detectron2', 'from_torchvision',
    'load_pickle', 'load_pretrained_backbone', 'load_state_dict',
]
