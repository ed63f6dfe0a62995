"""Run the published VLMo implementation (microsoft/unilm, folder vlmo/) in this process, from a checkout outside
this repository, beside vlmo_ds: its own model, forward and loss code, nothing re-implemented.

What it needs and how it gets it (nothing of it is committed here):
- the checkout: the folder that holds the published `vlmo` package (unilm's vlmo/ folder, with setup.py);
- its imports pytorch_lightning, transformers (BERT embeddings and MLM transform), torchmetrics and scipy, installed
  without dependencies into a folder of their own (published_requirements.txt beside this file; torch stays this
  environment's wheel) and put in front of sys.path for this process only;
- timm (create_model and four small helpers): timm imports torchvision, which does not import beside the CPU torch
  wheel, so a stand-in below provides exactly what multiway_transformer.py takes from it.

Three adaptations let GPU-only, multi-process code take a single-process CPU step, none of them touching its maths:
- torch.distributed runs as a gloo group of one process, so the published gathers (ITC features, ITM candidates)
  run for real and return this rank's tensors;
- the published code moves tensors with `.to(device=t.get_device())`, which is -1 (an error) for a CPU tensor:
  during a published step `Tensor.get_device` answers the tensor's device instead;
- `self.log` outside a Lightning Trainer is a no-op with a warning (Lightning's own behaviour), silenced here.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import logging
import sys
import types
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vlmo_ds.model.block import DropPath  # timm's stochastic depth, the same rule (the published blocks pass p positionally)
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.model.flops import image_text_step_flops

ARCHS = {"base": "vlmo_base_patch16", "large": "vlmo_large_patch16", "base_plus": "vlmo_base_plus_patch16"}
"""Our presets that the published code defines (its registered model_arch names)."""
LOSS_NAMES = ("itm", "itc", "mlm", "textmlm", "vqa", "nlvr2", "irtr")
PUBLISHED_IGNORE = -100
SITE_PACKAGES = ("pytorch_lightning", "transformers", "torchmetrics", "scipy")
REQUIREMENTS = Path(__file__).with_name("published_requirements.txt")


class PublishedCodeError(RuntimeError):
    """The checkout or its dependencies are missing or unusable: the message says what to do."""


def checkout_package(checkout: Path) -> Path:
    """The folder to put on sys.path: `checkout` itself or its vlmo/ subfolder, whichever holds vlmo/modules."""
    for root in (checkout, checkout / "vlmo"):
        if (root / "vlmo" / "modules" / "vlmo_module.py").is_file():
            return root
    raise PublishedCodeError(
        f"no published VLMo code under {checkout} (expected vlmo/modules/vlmo_module.py there or in its vlmo/ "
        "folder); check out microsoft/unilm from GitHub (only its vlmo/ folder is needed) outside this repository "
        "and pass that folder")


def _timm_standin() -> dict[str, types.ModuleType]:
    """timm.models (create_model), timm.models.layers and timm.models.registry as multiway_transformer.py uses them."""
    registry: dict[str, object] = {}

    def register_model(fn):
        registry[fn.__name__] = fn
        return fn

    def create_model(name: str, pretrained: bool = False, **kwargs):
        # timm drops keyword arguments left at None (the published call passes drop_block_rate=None)
        return registry[name](pretrained=pretrained, **{k: v for k, v in kwargs.items() if v is not None})

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    layers, reg = types.ModuleType("timm.models.layers"), types.ModuleType("timm.models.registry")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, nn.init.trunc_normal_
    reg.register_model = register_model
    models.create_model, models.layers, models.registry = create_model, layers, reg
    timm.models = models
    modules = {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": reg}
    for name, module in modules.items():  # importlib.util.find_spec (transformers probes for timm) needs a spec
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return modules


def import_published(checkout: Path, site: Path | None):
    """The published LightningModule class, imported from `checkout` with the packages of `site` (None: installed)."""
    root = checkout_package(checkout)
    if site is not None:
        if not site.is_dir():
            raise PublishedCodeError(f"--site {site} is not a folder; install into it with: pip install --no-deps "
                                     f"--target {site} -r {REQUIREMENTS}")
        sys.path.insert(0, str(site))
    sys.path.insert(0, str(root))
    sys.modules.update(_timm_standin())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from vlmo.modules.vlmo_module import VLMo as PublishedVLMo
    except ImportError as err:
        raise PublishedCodeError(f"the published code does not import ({err}); install what it needs with: "
                                 f"pip install --no-deps --target DIR -r {REQUIREMENTS} and pass --site DIR") from err
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # its rank_zero_info lines at model build
    return PublishedVLMo


def published_config(cfg: ModelConfig, preset_name: str) -> dict:
    """The published config (its task_mlm_itm_itc_* named configs) for the model our preset describes."""
    if preset_name not in ARCHS:
        raise PublishedCodeError(f"the published code has no model for preset {preset_name!r}; "
                                 f"choose one of {', '.join(ARCHS)}")
    return {"model_arch": ARCHS[preset_name], "image_size": cfg.image_size, "max_text_len": cfg.max_text_len,
            "max_text_len_of_initckpt": cfg.table_text_len, "vocab_size": cfg.vocab_size,
            "drop_path_rate": cfg.drop_path_rate,
            "loss_names": {k: int(k in ("itm", "itc", "mlm")) for k in LOSS_NAMES},
            "load_path": "", "test_only": False, "vqav2_label_size": 3129, "get_recall_metric": False}


def published_step_flops(cfg: ModelConfig, batch: int) -> int:
    """FLOPs of a published step: our count of the same passes (ITC image and text passes with the VL path, 4B fused
    pairs, the patch embeddings), with its MLM head scoring every text position (mlm_score over all text_feats)."""
    return image_text_step_flops(cfg, batch, mlm=True, itm=True, mlm_ratio=1.0)


def single_process_group() -> None:
    """A gloo group of one process: the published objectives call torch.distributed unconditionally."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def build_published(cls, cfg: ModelConfig, preset_name: str, state: dict[str, torch.Tensor]):
    """The published model in training mode holding `state` (export_published of our model): every parameter set."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(published_config(cfg, preset_name))
    result = model.load_state_dict(state, strict=False)
    # BERT's position_ids is a non-persistent buffer in the transformers release we install: nothing to load
    unexpected = [k for k in result.unexpected_keys if k != "text_embeddings.position_ids"]
    if result.missing_keys or unexpected:
        raise PublishedCodeError(f"our exported weights do not fit the published model (missing {result.missing_keys},"
                                 f" unexpected {unexpected})")
    return model.train()


def published_batch(batch: dict) -> dict:
    """Our batch in the published keys: images as a one-element list, labels -100 where nothing is predicted."""
    ids = batch["text_ids"]
    return {"image": [batch["image"]], "text_ids": ids, "text_masks": batch["text_mask"],
            "text_labels": torch.full_like(ids, PUBLISHED_IGNORE), "text_ids_mlm": batch["mlm_ids"],
            "text_labels_mlm": batch["mlm_labels"]}


def _device_of(tensor: torch.Tensor) -> torch.device:
    return tensor.device


@contextlib.contextmanager
def cpu_get_device():
    """Tensor.get_device answers a device the published `.to(device=...)` calls accept on a CPU tensor."""
    original = torch.Tensor.get_device
    torch.Tensor.get_device = _device_of
    try:
        yield
    finally:
        torch.Tensor.get_device = original


def published_losses(model, batch: dict) -> dict[str, torch.Tensor]:
    """The published forward with its pre-training tasks (itc, itm hard negatives, mlm): its losses by name."""
    from vlmo.modules import vlmo_utils

    with cpu_get_device(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        vlmo_utils.set_task(model)
        out = model(batch)
    return {k: v for k, v in out.items() if k.endswith("_loss")}


def published_step(model, batch: dict) -> torch.Tensor:
    """Its own training_step (the sum of every loss) and the backward pass Lightning runs after it."""
    with cpu_get_device(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        total = model.training_step(batch, 0)
    total.backward()
    return total.detach()
