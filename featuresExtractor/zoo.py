"""The paper's backbone zoo: its 37 extractor names mapped to open_clip, timm and torchvision.

The paper's code defined 37 extractors, most loaded through `torch.hub`
repositories with taps picked by child index. `ZOO` maps each name to the
maintained equivalent: an open_clip architecture and tag, a timm model and
pretrained tag, or a torchvision builder and weights enum, with the paper's own
taps named by module path. `zoo_table()` renders the table below from `ZOO`, so
the docs cannot drift from the code.

## The paper's taps, as module paths of today's models

The paper's code names a tap by attribute (`layer1`) or by position in
`named_modules()` (`-2`: the module just before the classifier), positions that hold only
for the library versions it ran. Each is named here by the module of today's model
that outputs the same thing:

- CLIP ResNets: `layer1`..`layer4` and `attnpool`, as the paper lists them.
- `clip_vit32_b`: `ln_post`. OpenAI's ViT applies `ln_post` to the class token before the
  projection, so the paper's tap is that 768-d token, not the 512-d embedding. open_clip applies
  `ln_post` to the whole token sequence unless `final_ln_after_pool`; the tower is built with that
  flag (`clip_models.build_tower`), which leaves the embedding as it was (LayerNorm acts on each
  token alone and the class token is what is pooled), and `ln_post` then outputs the class token.
- torchvision ResNets and the semi/weakly and self-supervised ResNets: `layer1`..`layer4`.
- `alexnet`: `features`, the conv trunk (256 channels pooled); the paper took no classifier tap.
- `efficientnet_b0`..`b3`: the paper's `[-2]` is the pooled pre-logits of gen-efficientnet; in timm's
  EfficientNet that is `global_pool` (after `conv_head`, `bn2`; before `classifier`): 1280-d for b0.
- BiT: `[6, 44, 93, -6]` (`137` for R152) are `stages.0`, `stages.1`, `stages.2` and the final
  `norm` (the fourth stage after its norm).
- `ViT`: `[-2]` is the pooled class token before the head: timm's `head_drop` (after `fc_norm`).
- DINO's ViTs: `head`; DINO's hub models and timm's `.dino` tags both have an identity head, so it
  outputs the class token (384-d for DeiT-S, 768-d for ViT-B).

`--layers` picks any other modules.

Beyond the 37 names, any timm model (`timm:NAME[.TAG]` or a bare timm name) and
any torchvision model (`torchvision:NAME`, or a bare name timm does not know)
works, with `--layers` choosing the taps (default: the last four stages timm's
`feature_info` lists; for torchvision, `layer1`..`layer4` when the model has them).

Weights: timm's come from the Hugging Face cache (`HF_HUB_OFFLINE=1` honoured),
torchvision's from the torch hub cache (`TORCH_HOME`), or from `--weights FILE`
for both (read with `weights_only=True`); `--pretrained none` is a random
initialisation from a fixed seed. The eval transform is the library's own by default:
`timm.data.resolve_model_data_config` + `timm.data.create_transform`, or the
torchvision weights enum's `transforms()`; `--transform paper` gives the paper's
(`featuresExtractor.transforms.paper_transform`).

Example:
    >>> ZOO["resnet50_swsl"].identifier, ZOO["resnet50_swsl"].tag
    ('resnet50', 'fb_swsl_ig1b_ft_in1k')
    >>> ZOO["dino_vitb16"].taps
    ('head',)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from toolkit.utils import UserError

from .backbone_base import (Backbone, BackboneSpec, assignable, build_and_load, hf_cache_dir, logging_disabled, read_state_dict,
                            weights_source)
from .taps import CLIP_RESNET_TAPS, RESNET_STAGES, default_taps, validate_taps

__all__ = ["ZooEntry", "ZOO", "FILE_ONLY", "zoo_spec", "other_spec", "load_zoo_backbone", "build_model",
           "weights_location", "zoo_table"]

#: The `pretrained` value of a spec whose weights exist only as a file the user passes with --weights.
FILE_ONLY = "file"

EFFICIENTNET = ("global_pool",)  # the pre-logits alone: the module before the classifier, the paper's [-2]
BIT = ("stages.0", "stages.1", "stages.2", "norm")
VIT = ("head_drop",)  # the pre-logits: pooled class token after the final norm
DINO_VIT = ("head",)  # timm's .dino weights have no classifier: the head is DINO's own output (the class token)


@dataclass(frozen=True)
class ZooEntry:
    """One of the paper's extractors and its maintained equivalent.

    `library` is open_clip, timm, torchvision or "" (no maintained equivalent);
    `identifier` the open_clip architecture, timm model or torchvision builder;
    `tag` the open_clip/timm pretrained tag or the torchvision weights enum member
    (`FILE_ONLY`: no package ships the weights, pass them with --weights).
    """

    name: str
    family: str
    library: str
    identifier: str
    tag: str | None
    taps: tuple[str, ...]
    paper: str  # how the paper's code loaded it
    note: str = ""  # differences from the paper's model, or why there is no equivalent
    alternative: str = ""  # what to use instead when `library` is ""

    @property
    def status(self) -> str:
        if not self.library:
            return "unavailable"
        return "weights file only" if self.tag == FILE_ONLY else "available"


def _e(*args, **kw) -> tuple[str, ZooEntry]:
    entry = ZooEntry(*args, **kw)
    return entry.name, entry


_SWSL = "torch.hub facebookresearch/semi-supervised-ImageNet1K-models"
_WSL = "torch.hub facebookresearch/WSL-Images"
_DINO = "torch.hub facebookresearch/dino"
_EFF = ("TF-ported AutoAugment ImageNet weights, the checkpoints efficientnet_pytorch's from_pretrained loads; "
        "pre-logits = global_pool after conv_head")

ZOO: dict[str, ZooEntry] = dict([
    _e("clip_rn50", "CLIP", "open_clip", "RN50", "openai", CLIP_RESNET_TAPS, "clip.load('RN50')"),
    _e("clip_rn101", "CLIP", "open_clip", "RN101", "openai", CLIP_RESNET_TAPS, "clip.load('RN101')"),
    _e("clip_rn50x4", "CLIP", "open_clip", "RN50x4", "openai", CLIP_RESNET_TAPS, "clip.load('RN50x4')",
       "the published pipeline"),
    _e("clip_vit32_b", "CLIP", "open_clip", "ViT-B-32", "openai", ("ln_post",), "clip.load('ViT-B/32')",
       "ln_post: the 768-d class token before the projection, as OpenAI's ViT applies ln_post"),
    *[_e(f"resnet{d}", "torchvision ImageNet", "torchvision", f"resnet{d}", f"ResNet{d}_Weights.IMAGENET1K_V1",
         RESNET_STAGES, f"torchvision.models.resnet{d}(pretrained=True)") for d in (18, 34, 50, 101, 152)],
    _e("alexnet", "torchvision ImageNet", "torchvision", "alexnet", "AlexNet_Weights.IMAGENET1K_V1",
       ("features",), "torchvision.models.alexnet(pretrained=True)", "the conv trunk only, as the paper tapped it"),
    *[_e(f"efficientnet_b{i}", "EfficientNet", "timm", f"tf_efficientnet_b{i}", "aa_in1k", EFFICIENTNET,
         f"efficientnet_pytorch EfficientNet.from_pretrained('efficientnet-b{i}')", _EFF) for i in range(4)],
    *[_e(f"BiT-M-{arch}_in21k", "Big Transfer", "timm", f"resnetv2_{arch[1:].lower()}_bit", "goog_in21k", BIT,
         f"big_transfer BiT-M-{arch} ImageNet-21k checkpoint", "norm is the pre-activation output of the last stage "
         "(timm's forward_features)")
      for arch in ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")],
    _e("ViT", "ViT", "timm", "vit_base_patch16_224", "orig_in21k_ft_in1k", VIT, "timm vit_base_patch16_224 (2021)",
       "the 2021 default weights (Google's in21k fine-tuned on in1k); timm's default tag is now augreg2"),
    _e("resnet50_swsl", "semi/weakly supervised", "timm", "resnet50", "fb_swsl_ig1b_ft_in1k", RESNET_STAGES, _SWSL),
    _e("resnext101_32x8d_swsl", "semi/weakly supervised", "timm", "resnext101_32x8d", "fb_swsl_ig1b_ft_in1k",
       RESNET_STAGES, _SWSL),
    _e("resnext101_32x16d_swsl", "semi/weakly supervised", "timm", "resnext101_32x16d", "fb_swsl_ig1b_ft_in1k",
       RESNET_STAGES, _SWSL),
    _e("resnet50_ssl", "semi/weakly supervised", "timm", "resnet50", "fb_ssl_yfcc100m_ft_in1k", RESNET_STAGES, _SWSL),
    _e("resnext101_32x8d_ssl", "semi/weakly supervised", "timm", "resnext101_32x16d", "fb_ssl_yfcc100m_ft_in1k",
       RESNET_STAGES, _SWSL, "the paper's code defines this key twice and the second, which wins, loads the 32x16d model: "
       "mapped to what the paper ran; timm:resnext101_32x8d.fb_ssl_yfcc100m_ft_in1k is the 32x8d"),
    *[_e(f"resnext101_32x{w}d_wsl", "semi/weakly supervised", "timm", f"resnext101_32x{w}d", "fb_wsl_ig1b_ft_in1k",
         RESNET_STAGES, _WSL) for w in (8, 16, 32)],
    _e("resnext101_32x48d_wsl", "semi/weakly supervised", "", "resnext101_32x48d", None, RESNET_STAGES, _WSL,
       "neither timm (which dropped ig_resnext101_32x48d) nor torchvision ships the 32x48d WSL model",
       "resnext101_32x32d_wsl, the largest WSL model timm ships"),
    _e("barlow", "self-supervised", "torchvision", "resnet50", FILE_ONLY, RESNET_STAGES,
       "torch.hub facebookresearch/barlowtwins resnet50",
       "a torchvision ResNet-50 whose weights only Facebook's repository publishes (neither timm nor torchvision "
       "ships them): pass --weights with https://dl.fbaipublicfiles.com/barlowtwins/"
       "ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/resnet50.pth"),
    _e("dino_resnet50", "self-supervised", "torchvision", "resnet50", FILE_ONLY, RESNET_STAGES, f"{_DINO} dino_resnet50",
       "a torchvision ResNet-50 whose DINO weights neither timm nor torchvision ships: pass --weights with "
       "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth"),
    _e("dino_vitb16", "self-supervised", "timm", "vit_base_patch16_224", "dino", DINO_VIT, f"{_DINO} dino_vitb16"),
    _e("dino_vitb8", "self-supervised", "timm", "vit_base_patch8_224", "dino", DINO_VIT, f"{_DINO} dino_vitb8"),
    _e("deits16", "self-supervised", "timm", "vit_small_patch16_224", "dino", DINO_VIT, f"{_DINO} dino_vits16"),
    _e("deits8", "self-supervised", "timm", "vit_small_patch8_224", "dino", DINO_VIT, f"{_DINO} dino_vits8"),
    _e("facenet", "faces", "", "InceptionResnetV1", None, (), "facenet_pytorch InceptionResnetV1(pretrained='vggface2')",
       "only facenet-pytorch ships the VGGFace2 InceptionResnetV1, and it pins an old torch (<2.3) this toolkit "
       "cannot share; timm's inception_resnet_v2 is a different network trained on ImageNet, not faces",
       "facenet-pytorch in its own environment, or --model timm:inception_resnet_v2.tf_in1k for a generic "
       "ImageNet Inception-ResNet"),
])


# ---------------------------------------------------------------- name resolution

def zoo_spec(name: str) -> BackboneSpec:
    """The `BackboneSpec` of a zoo name, or a `UserError` saying why it has no equivalent."""
    entry = ZOO[name]
    if not entry.library:
        raise UserError(f"--model {name} has no maintained equivalent: {entry.note}; use {entry.alternative}")
    return BackboneSpec(name, entry.identifier, entry.tag, entry.taps, library=entry.library)


def _split(identifier: str) -> tuple[str, str | None]:
    model, _, tag = identifier.partition(".")
    return model, tag or None


def other_spec(name: str) -> BackboneSpec | None:
    """A spec for a timm or torchvision name outside the zoo (`timm:NAME[.TAG]`, `torchvision:NAME`, or bare), else None."""
    import timm
    import torchvision

    library, sep, ident = name.partition(":")
    if not sep:
        library, ident = "", name
    if library not in ("", "timm", "torchvision"):
        return None
    model, tag = _split(ident)
    if library in ("", "timm") and model in timm.list_models():
        if tag is None:
            # timm's default tag for the model, as timm.create_model(model, pretrained=True) would pick
            cfg = timm.models.get_pretrained_cfg(model)
            tag = getattr(cfg, "tag", None) or None
        return BackboneSpec(name, model, tag, None, library="timm")
    if library in ("", "torchvision") and ident in torchvision.models.list_models():
        weights = torchvision.models.get_model_weights(ident).DEFAULT
        return BackboneSpec(name, ident, str(weights), None, library="torchvision")
    if library:
        raise UserError(f"unknown {library} model {ident!r}; list them with "
                        f"python -c 'import {library}; print({library}.{'models.' if library == 'torchvision' else ''}"
                        f"list_models())'")
    return None


# ---------------------------------------------------------------- weights

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _missing(spec: BackboneSpec, where: str, err: str) -> UserError:
    return UserError(
        f"cannot get the {spec.library} {spec.arch} '{spec.pretrained}' weights ({err}): they are not in {where}. "
        f"Either pass --weights FILE, or run once online to fill the Hugging Face cache ({hf_cache_dir()}, timm) or "
        f"the torch hub cache ({_hub_checkpoints()}, torchvision; TORCH_HOME moves it) and then set HF_HUB_OFFLINE=1, "
        f"or pass --pretrained none for random weights")


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _timm_cfg(spec: BackboneSpec):
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(f"{spec.arch}.{spec.pretrained}")
    except RuntimeError:  # timm's answer to a tag the architecture does not have
        cfg = None
    if cfg is None:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{spec.arch}.*")]
        raise UserError(f"timm has no pretrained tag {spec.pretrained!r} for {spec.arch}; known tags: "
                        f"{tags or 'none'}, or --pretrained none")
    return cfg


def _tv_weights(spec: BackboneSpec):
    """The torchvision weights enum member a spec names ("ResNet50_Weights.IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT")."""
    import torchvision

    enum = torchvision.models.get_model_weights(spec.arch)
    try:
        return enum[spec.pretrained.rsplit(".", 1)[-1]]
    except KeyError:
        raise UserError(f"torchvision has no weights {spec.pretrained!r} for {spec.arch}; known: "
                        f"{[str(w) for w in enum]}, or --pretrained none") from None


def weights_location(spec: BackboneSpec) -> tuple[str, str, str | None]:
    """(kind, where, cached path or None) for a spec's packaged weights, without touching the network.

    kind is "hf" (where = "repo/filename", timm) or "url" (where = the URL, torch hub cache).
    """
    if spec.library == "timm":
        from huggingface_hub import try_to_load_from_cache

        cfg = _timm_cfg(spec)
        if cfg.hf_hub_id:
            repo = cfg.hf_hub_id.split("@")[0]
            names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else \
                ["model.safetensors", "pytorch_model.bin"]
            for filename in names:
                found = try_to_load_from_cache(repo, filename)
                if isinstance(found, str):
                    return "hf", f"{repo}/{filename}", found
            return "hf", f"{repo}/{names[0]}", None
        url = cfg.url
    else:
        url = _tv_weights(spec).url
    path = _hub_checkpoints() / os.path.basename(url)
    return "url", url, str(path) if path.is_file() else None


def _fetch(spec: BackboneSpec) -> str:
    kind, where, cached = weights_location(spec)
    if cached:
        return cached
    if _offline():
        raise _missing(spec, "the local caches", "HF_HUB_OFFLINE is set")
    try:
        if kind == "hf":
            from huggingface_hub import hf_hub_download

            repo, filename = where.rsplit("/", 1)
            try:
                return hf_hub_download(repo, filename)
            except OSError:
                if filename != "model.safetensors":
                    raise
                return hf_hub_download(repo, "pytorch_model.bin")
        path = _hub_checkpoints() / os.path.basename(where)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(where, str(path))  # writes a temporary file and renames it when complete
        return str(path)
    except OSError as err:  # hub misses, URL errors and network failures are all OSError subclasses
        raise _missing(spec, "the local caches", f"download failed: {type(err).__name__}") from None


# ---------------------------------------------------------------- building

_HEADS = ("fc.", "classifier.", "head.")  # classifier weights a backbone-only checkpoint may lack


def _load_file_into(model: nn.Module, state: dict, path: Path, spec: BackboneSpec, assign: bool) -> list[str]:
    """Load a plain state dict into a torchvision model; returns the classifier keys the file lacked."""
    try:
        missing, unexpected = model.load_state_dict(assignable(state, model), strict=False, assign=assign)
    except RuntimeError as err:  # shape mismatches are raised even when strict=False
        raise UserError(f"cannot load weights from {path} into torchvision {spec.arch}: "
                        f"{' '.join(str(err).split())[:300]}") from None
    bad = [k for k in missing if not k.startswith(_HEADS)]
    if unexpected or bad:
        raise UserError(f"cannot load weights from {path} into torchvision {spec.arch}: missing "
                        f"{bad[:5]}, unexpected {unexpected[:5]}")
    return list(missing)


def _build_timm(spec: BackboneSpec, file: str | None, kwargs: dict, on: str) -> nn.Module:
    import timm

    # A random init still takes the tag's configuration (DINO's tags have no classifier, BiT's 21k classes).
    tag = spec.pretrained or (ZOO[spec.name].tag if spec.name in ZOO else None)
    name = f"{spec.arch}.{tag}" if tag and tag != FILE_ONLY else spec.arch

    def build(where: str) -> nn.Module:
        with torch.device(where), logging_disabled(logging.WARNING):
            return timm.create_model(name, pretrained=False, **kwargs)

    try:
        if file is None:
            return build(on)
        # Read here (safetensors, or torch.load with weights_only=True, one-line errors).
        state = read_state_dict(file)
        try:  # the file holds exactly the model's tensors: assign them to a model built without initialising
            return build_and_load(build, lambda m, assign: m.load_state_dict(assignable(state, m), assign=assign))[0]
        except RuntimeError:  # other names or shapes: timm's own loader, with its checkpoint filter for the model
            with logging_disabled(logging.WARNING):
                return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state), **kwargs)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"cannot build timm {name} from {file or 'random init'}: "
                        f"{' '.join(str(err).split())[:300]}") from None


def build_model(spec: BackboneSpec, file: str | None, model_kwargs: dict | None = None,
                on: str = "cpu") -> tuple[nn.Module, object, list]:
    """(model, eval transform, missing classifier keys) with weights from `file`, or randomly initialised on `on`.

    Weights from a file are assigned to a model built on the meta device (`backbone_base.build_and_load`),
    so no random initialisation is spent on them. `on="meta"` without a file builds a shape-only model.
    """
    kwargs = dict(model_kwargs or {})
    if spec.library == "timm":
        from timm.data import create_transform, resolve_model_data_config

        model = _build_timm(spec, file, kwargs, on)
        return model, create_transform(**resolve_model_data_config(model), is_training=False), []
    import torchvision

    def build(where: str) -> nn.Module:
        with torch.device(where):
            return torchvision.models.get_model(spec.arch, weights=None, **kwargs)

    tv = _tv_weights(spec) if spec.pretrained and spec.pretrained != FILE_ONLY else \
        torchvision.models.get_model_weights(spec.arch).DEFAULT
    if file is None:
        return build(on), tv.transforms(), []
    state = read_state_dict(file)
    model, missing = build_and_load(build, lambda m, assign: _load_file_into(m, state, Path(file), spec, assign))
    return model, tv.transforms(), missing


def load_zoo_backbone(spec: BackboneSpec, weights: str | os.PathLike | None = None,
                      device: str | torch.device = "cpu", init_seed: int = 0,
                      model_kwargs: dict | None = None) -> Backbone:
    """Build a timm or torchvision backbone, its eval transform and its weights record.

    Weights come from `weights` (a local file), else the spec's pretrained tag or
    weights enum (from the cache, downloaded once unless `HF_HUB_OFFLINE=1`), else a
    random initialisation drawn from `init_seed`. `model_kwargs` go to the
    library's builder (tests: `img_size` for a small ViT). The whole classifier is
    `Backbone.visual`, in eval mode with gradients off; taps are module paths in it.

    Example:
        >>> from dataclasses import replace
        >>> bb = load_zoo_backbone(replace(zoo_spec("resnet18"), pretrained=None))   # random init, no download
        >>> bb.spec.taps, type(bb.transform).__name__
        (('layer1', 'layer2', 'layer3', 'layer4'), 'ImageClassification')
    """
    if weights is None and spec.pretrained == FILE_ONLY:
        entry = ZOO.get(spec.name)
        raise UserError(f"--model {spec.name}: no package ships these weights; {entry.note if entry else ''}; "
                        f"or --pretrained none for random weights")
    path, source = weights_source(spec, weights, _fetch, init_seed)
    file = str(path) if path is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model, transform, missing = build_model(spec, file, model_kwargs)
    if missing:
        source["missing_classifier_keys"] = len(missing)
    model = model.eval().requires_grad_(False).to(device)
    taps = spec.taps or default_taps(model)
    validate_taps(model, taps)
    return Backbone(replace(spec, taps=tuple(taps)), model, transform, source)


# ---------------------------------------------------------------- docs

def zoo_table() -> str:
    """The 37 names as a Markdown table (name, family, library, identifier, tag, taps, status, paper's source, note)."""
    lines = ["| name | family | library | identifier | pretrained tag / weights | taps | status | paper's source | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in ZOO.values():
        note = e.note + (f"; instead: {e.alternative}" if e.alternative else "")
        lines.append(f"| `{e.name}` | {e.family} | {e.library or '-'} | `{e.identifier}` | "
                     f"{f'`{e.tag}`' if e.tag else '-'} | {', '.join(f'`{t}`' for t in e.taps) or '-'} | "
                     f"{e.status} | {e.paper} | {note} |")
    return "\n".join(lines)


# The docs' table of the 37 names is rendered from ZOO itself, so it cannot drift from the code.
__doc__ += "\n## The 37 names\n\n" + zoo_table() + "\n"
