"""Backbones, initial weights, and the model file that carries everything
needed to use a trained model without ``params.yaml``.

A ``Classifier`` is a trunk (the network up to its pooled features: a
torchvision model, or with ``timm/<name>`` a timm model made with
``num_classes=0``) plus a linear head; the siamese stage adds an optional projection
head for the embedding. Model files hold plain tensors and python values only,
so they load with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import math
import socket
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from stages.lib.tables import check_breed_name

MODEL_FORMAT = "clickdog-model/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    """``trunk`` -> pooled features -> ``head`` logits; ``with_embedding`` also
    gives the (optionally projected and L2-normalised) embedding used by the
    siamese loss.

    Inputs are uint8 images (N, 3, H, W), or floats in [0, 1]; the model
    subtracts ``mean`` and divides by ``std`` itself, so loaders ship uint8
    (a quarter of the bytes through worker pipes and to the GPU) and the
    normalisation runs once per batch on the training device.
    """

    def __init__(self, trunk: nn.Module, feature_dim: int, num_classes: int, *, backbone: str,
                 embedding_dim: int = 0, normalize: bool = False,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.backbone_name = backbone  # what model.backbone named: load_initial_weights finds ImageNet weights by it
        # not in the state dict: the model file stores them as plain lists
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.trunk = trunk
        self.head = nn.Linear(feature_dim, num_classes)
        self.projection = nn.Linear(feature_dim, embedding_dim) if embedding_dim > 0 else None
        self.normalize = normalize
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor, with_embedding: bool = False):
        """Logits, or (logits, embedding): one method so DDP's hooks see both."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        features = self.trunk((x - self.mean) / self.std)
        logits = self.head(features)
        if not with_embedding:
            return logits
        emb = self.projection(features) if self.projection is not None else features
        if self.normalize:
            emb = F.normalize(emb.float(), dim=1)
        return logits, emb


def _split_last_linear(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace the model's last ``nn.Linear`` by an identity: what remains is the
    trunk. Works for the torchvision families (fc, classifier[-1], heads.head)."""
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None:
        raise ValueError(f"{type(model).__name__} has no final nn.Linear to replace")
    parent = model.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else model
    child = last_name.rpartition(".")[2]
    if isinstance(parent, nn.Sequential):
        parent[int(child)] = nn.Identity()
    else:
        setattr(parent, child, nn.Identity())
    return model, last.in_features


TIMM_PREFIX = "timm/"


def _timm_trunk(name: str) -> tuple[nn.Module, int]:
    """A timm model without its classifier (``num_classes=0``: pooled features out)."""
    try:
        import timm
    except ImportError as exc:
        raise ValueError(f"model.backbone {TIMM_PREFIX}{name}: timm is not installed "
                         f"(pip install 'clickdog[timm]', or pip install timm)") from exc
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise ValueError(f"model.backbone {TIMM_PREFIX}{name} is not a timm model; similar: {close}")
    trunk = timm.create_model(name, pretrained=False, num_classes=0)  # never downloads
    return trunk, int(trunk.num_features)


def build_model(backbone: str, num_classes: int, *, embedding_dim: int = 0, normalize: bool = False,
                mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Classifier:
    """A randomly initialised ``Classifier`` on a torchvision backbone, or a
    timm one named ``timm/<name>`` (``timm/convnext_tiny``)."""
    if backbone.startswith(TIMM_PREFIX):
        trunk, dim = _timm_trunk(backbone.removeprefix(TIMM_PREFIX))
        if (tuple(mean), tuple(std)) == (IMAGENET_MEAN, IMAGENET_STD):  # a new model: its backbone's own
            cfg = getattr(trunk, "pretrained_cfg", None) or {}  # normalisation (CLIP/EVA weights use others)
            mean, std = tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std))
    else:
        available = torchvision.models.list_models(module=torchvision.models)
        if backbone not in available:
            raise ValueError(f"model.backbone {backbone!r} is not a torchvision classification model (or timm/<name> "
                             f"for a timm one); choose one of: {', '.join(sorted(available))}")
        trunk, dim = _split_last_linear(torchvision.models.get_model(backbone, weights=None))
    return Classifier(trunk, dim, num_classes, backbone=backbone, embedding_dim=embedding_dim, normalize=normalize,
                      mean=mean, std=std)


def _imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """ImageNet weights: for a timm backbone, offline from a pip wheel (the whole
    model's: the caller keeps the trunk's part); for torchvision's, downloaded."""
    if backbone.startswith(TIMM_PREFIX):
        from stages.lib import pretrained  # timm's offline sources; imports timm only when used

        if backbone.removeprefix(TIMM_PREFIX) not in pretrained.OFFLINE_IMAGENET:
            offline = ", ".join(TIMM_PREFIX + name for name in pretrained.OFFLINE_IMAGENET)
            raise ValueError(f"model.weights: imagenet is for torchvision backbones and the timm ones with offline "
                             f"weights ({offline}); for {backbone}, download its weights file (model.safetensors "
                             f"from the Hugging Face hub), put it under models/weights/ and set model.weights to "
                             f"its path")
        return pretrained.imagenet_state_dict(backbone)
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    try:  # fail at once when offline instead of hanging in urlopen
        socket.create_connection(("download.pytorch.org", 443), timeout=5).close()
        # weights_only: a state dict needs no unpickling of code; check_hash: the
        # file must match the hash prefix in its torchvision file name
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except OSError as exc:
        raise RuntimeError(
            f"model.weights: imagenet needs internet to fetch {weights.url} ({exc}). Download that file "
            f"on a machine with internet, copy it into models/weights/ and set model.weights to its path.") from exc


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: no such file {path}")
    try:
        if path.suffix == ".safetensors":  # the format of timm's weights on the Hugging Face hub: tensors only
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a torch file: say which file
        raise ValueError(f"model.weights: {path} is not a readable weights file: {exc}") from exc
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        return {k.removeprefix("trunk."): v for k, v in obj["state_dict"].items() if k.startswith("trunk.")}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # a training checkpoint
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"model.weights: {path} holds no state dict")
    return obj


def load_initial_weights(model: Classifier, weights: str) -> None:
    """Load ``none`` | ``imagenet`` | a path into the trunk; the head stays new
    because its class count is ours."""
    if weights in (None, "", "none"):
        return
    backbone_name = model.backbone_name
    if weights == "imagenet":
        state = _imagenet_state_dict(backbone_name)
    else:
        state = _file_state_dict(Path(weights))
    trunk_state = model.trunk.state_dict()
    state = {k: v for k, v in state.items() if k in trunk_state}
    # BatchNorm's num_batches_tracked is a step counter, not a weight (read only when
    # momentum is None), and weights converted from other frameworks often leave it out
    # (the offline ImageNet ones, stages/lib/pretrained.py): a missing counter keeps the trunk's own
    counters = {k for k in trunk_state if k.rpartition(".")[2] == "num_batches_tracked"}
    missing = set(trunk_state) - set(state) - counters
    if not state or missing:
        raise ValueError(f"model.weights {weights!r} does not fit backbone {backbone_name}: "
                         f"{len(missing)} of {len(trunk_state)} trunk tensors missing (e.g. {sorted(missing)[:3]})")
    state = {**{k: trunk_state[k] for k in counters}, **state}
    try:
        model.trunk.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatch
        raise ValueError(f"model.weights {weights!r} does not fit backbone {backbone_name}: {exc}") from exc


def create_model(backbone: str, num_classes: int, weights: str = "none", **kwargs: Any) -> Classifier:
    model = build_model(backbone, num_classes, **kwargs)
    load_initial_weights(model, weights)
    return model


def model_file(model: Classifier, *, backbone: str, classes: list[str], image_size: int,
               extra: dict | None = None) -> dict[str, Any]:
    """The saved form of a trained model: weights plus what is needed to use it.
    Its metadata is checked as :func:`load_model_file` checks it: a file that
    could not be loaded again is refused when it is written, not when used."""
    obj = {
        "format": MODEL_FORMAT,
        "backbone": backbone,
        "classes": list(classes),
        "image_size": int(image_size),
        "mean": [round(v, 6) for v in model.mean.flatten().tolist()],
        "std": [round(v, 6) for v in model.std.flatten().tolist()],
        "embedding_dim": model.projection.out_features if model.projection is not None else 0,
        "normalize": bool(model.normalize),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    check_model_file(obj, f"the model file of {backbone}")
    return obj


def load_model_file(path: str | Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a model from its file alone; returns (model in eval mode, metadata).

    The file is untrusted input (predict takes any path): it loads with
    ``weights_only=True``, its metadata is checked before a model is built
    (:func:`check_model_file`), and its weights must fit that model exactly.
    Every way it can be wrong raises :class:`ModelFileError`, one line naming
    the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable clickdog model file: {_one_line(exc)}") from exc
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: not a clickdog model file ({MODEL_FORMAT})")
    check_model_file(obj, str(path))
    try:
        model = build_model(obj["backbone"], len(obj["classes"]), embedding_dim=obj["embedding_dim"],
                            normalize=obj["normalize"], mean=obj["mean"], std=obj["std"])
    except ValueError as exc:  # an unknown backbone, timm not installed
        raise ModelFileError(f"{path}: {_one_line(exc)}") from exc
    _check_weights_fit(model, obj["state_dict"], f"{path}: the weights do not fit a {obj['backbone']} "
                                                 f"of {len(obj['classes'])} classes")
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except (RuntimeError, TypeError) as exc:  # what the checks above did not foresee
        raise ModelFileError(f"{path}: the weights do not load: {_one_line(exc)}") from exc
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return model.to(device).eval(), meta


class ModelFileError(ValueError):
    """A model file that cannot be used; the message (one line) names the file and says why."""


# Bounds on what a model file may ask for, checked before a model is built from it.
MAX_CLASSES = 100_000
IMAGE_SIZE_RANGE = (8, 4096)  # pixels a side: the eval transform resizes every image to this
_MODEL_FILE_KEYS = {"backbone": (str, "a string"), "classes": (list, "a list"), "image_size": (int, "an int"),
                    "mean": (list, "a list"), "std": (list, "a list"), "embedding_dim": (int, "an int"),
                    "normalize": (bool, "a bool"), "state_dict": (dict, "a dict")}


def check_model_file(obj: dict[str, Any], where: str) -> None:
    """Raise :class:`ModelFileError` (starting with ``where``) unless the
    metadata of a model file's dict is complete, of the right types, within
    bounds, and its head tensors match its classes and embedding size. The
    head is checked here, before building, so that a file cannot make the
    loader allocate more than the tensors it holds (a million classes over
    a 3-class head)."""
    missing = [k for k in _MODEL_FILE_KEYS if k not in obj]
    if missing:
        raise ModelFileError(f"{where}: the model file lacks {', '.join(map(repr, missing))}")
    for key, (kind, described) in _MODEL_FILE_KEYS.items():
        # bool is an int in Python: True is no image size
        if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
            raise ModelFileError(f"{where}: {key!r} must be {described}, not {type(obj[key]).__name__}")
    classes = obj["classes"]
    if not 1 <= len(classes) <= MAX_CLASSES:
        raise ModelFileError(f"{where}: 'classes' must hold 1 to {MAX_CLASSES} classes, not {len(classes)}")
    seen: set[str] = set()
    for i, name in enumerate(classes):
        try:
            check_breed_name(name, f"{where}: classes[{i}]")
        except ValueError as exc:
            raise ModelFileError(str(exc)) from None
        if name in seen:
            raise ModelFileError(f"{where}: classes[{i}]: {name!r} twice")
        seen.add(name)
    low, high = IMAGE_SIZE_RANGE
    if not low <= obj["image_size"] <= high:
        raise ModelFileError(f"{where}: 'image_size' must be in {low}..{high}, not {obj['image_size']}")
    for key in ("mean", "std"):
        values = obj[key]
        if (len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                        for v in values) or (key == "std" and min(values) <= 0)):
            raise ModelFileError(f"{where}: {key!r} must be 3 finite numbers{' > 0' if key == 'std' else ''} "
                                 f"(one per RGB channel), not {values!r}"[:300])
    if obj["embedding_dim"] < 0:
        raise ModelFileError(f"{where}: 'embedding_dim' must be >= 0, not {obj['embedding_dim']}")
    state = obj["state_dict"]
    if not state:
        raise ModelFileError(f"{where}: 'state_dict' is empty")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ModelFileError(f"{where}: 'state_dict' must map names to tensors, not {name!r}"[:200]
                                 + f" to a {type(tensor).__name__}")
    rows = {"head.weight": len(classes), "head.bias": len(classes)}
    if obj["embedding_dim"]:
        rows.update({"projection.weight": obj["embedding_dim"], "projection.bias": obj["embedding_dim"]})
    for name, n in rows.items():  # one absent is reported with the tensors the built model misses
        if name in state and (state[name].dim() not in (1, 2) or state[name].shape[0] != n):
            raise ModelFileError(f"{where}: {name} has shape {tuple(state[name].shape)}, not ({n}, ...) for "
                                 f"{len(classes)} classes and embedding_dim {obj['embedding_dim']}")


def _check_weights_fit(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`ModelFileError` unless ``state`` holds exactly the model's
    tensors, each of its shape; the message counts what is missing,
    unexpected and misshapen and names a few (load_state_dict's own error
    is a multi-line traceback)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or misshapen:
        parts = [f"{len(names)} {kind} (e.g. {', '.join(map(repr, names[:3]))})"
                 for kind, names in (("missing", missing), ("unexpected", unexpected)) if names]
        parts += [f"{len(misshapen)} of another shape (e.g. {k!r}: {tuple(state[k].shape)} in the file, "
                  f"{tuple(expected[k].shape)} expected)" for k in misshapen[:1]]
        raise ModelFileError(f"{what}: tensors {'; '.join(parts)}"[:500])


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one short line (torch's are paragraphs)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
