"""SAM 2.1 (Hiera) backbone over the installed ``sam2`` package.

The model is the package's own ``SAM2Base``, built by ``sam2.build_sam.build_sam2``
from the package's hydra configs (``configs/models/sam2.yaml`` names them). The
Hiera trunk is split at the selector block: :meth:`SAM2Backbone.encode_prefix`
runs patch embedding and blocks 0..selector once; :meth:`SAM2Backbone._run_suffix`
runs the remaining blocks, the FPN neck and exactly what
``SAM2ImagePredictor.set_image_batch`` does after it (scalp, ``conv_s0``/``conv_s1``
on the high-resolution levels, the no-memory embedding). The AugModule acts only
through forward hooks on the attention modules of the augmented blocks; SAM 2 has
no neck injection.
"""
import math
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from sam2.build_sam import build_sam2
from sam2.modeling.backbones.hieradet import do_pool
from sam2.modeling.sam2_base import SAM2Base

from ..config import load_model_table
from ..registry import register_backbone
from .base import (Backbone, BlockGeometry, BlockPlan, DecodeOptions, Features, PrefixedAttention, padded_side,
                   split_heads)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_SIZES = {(96, 12): "hiera_t", (96, 16): "hiera_s", (112, 24): "hiera_b+", (144, 48): "hiera_l"}


def sam2_architectures() -> Dict[str, Dict[str, Any]]:
    """Name -> architecture entry (package config, overrides, checkpoint) from ``configs/models/sam2.yaml``."""
    return load_model_table("sam2.yaml")


def _hydra_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise TypeError(f"cannot express {v!r} as a hydra override value")


def hydra_overrides(tree: Dict[str, Any], prefix: str = "") -> List[str]:
    """A nested mapping -> hydra ``++dotted.key=value`` overrides (add or replace)."""
    out: List[str] = []
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out += hydra_overrides(value, path)
        else:
            out.append(f"++{path}={_hydra_value(value)}")
    return out


def build_sam2_model(arch: str, img_size: Optional[int] = None) -> Tuple[SAM2Base, Dict[str, Any]]:
    """A randomly initialised ``SAM2Base`` of the named architecture, in eval mode on the CPU.

    Built by ``sam2.build_sam.build_sam2`` (with its default post-processing
    overrides: dynamic multimask-by-stability in the decoder) from the package's
    hydra config plus the architecture's overrides. Returns (model, table entry).
    """
    table = sam2_architectures()
    if arch not in table:
        raise ValueError(f"unknown SAM 2 architecture {arch!r}; choose from {sorted(table)} (configs/models/sam2.yaml)")
    entry = dict(table[arch])
    overrides = hydra_overrides(entry.get("overrides") or {})
    if img_size is not None:
        overrides.append(f"++model.image_size={int(img_size)}")
    model = build_sam2(entry["config"], ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=overrides)
    _check_input_size(model)
    return model.eval(), entry


def _check_input_size(model: SAM2Base) -> None:
    """Refuse an input side the Hiera trunk cannot tile (patch grid vs windows and q-pooling)."""
    trunk = model.image_encoder.trunk
    s = model.image_size
    stride = trunk.patch_embed.proj.stride[0]
    need = math.lcm(trunk.window_spec[0], 2 ** len(trunk.q_pool_blocks))
    if s % (stride * need):
        raise ValueError(f"img_size {s} does not fit this Hiera trunk: use a multiple of {stride * need} (e.g. 1024)")


def _grid_after(trunk: torch.nn.Module, img_size: int, block: int) -> int:
    """Side of the token grid after trunk block ``block`` for an ``img_size`` input."""
    conv = trunk.patch_embed.proj
    g = (img_size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    for blk in trunk.blocks[: block + 1]:
        if blk.q_stride:
            g //= blk.q_stride[0]
    return g


def describe_sam2_state(state: dict) -> str:
    """Name the model a state dict belongs to, from its keys and shapes (for error messages)."""
    w = state.get("image_encoder.trunk.patch_embed.proj.weight")
    if w is None:
        if "image_encoder.patch_embed.proj.weight" in state:
            return "a SAM (ViT) checkpoint"
        return "not a SAM 2 checkpoint (no image_encoder.trunk.patch_embed.proj.weight)"
    depth = len({k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")})
    name = OFFICIAL_SIZES.get((w.shape[0], depth), "an unknown size")
    version = "SAM 2.1" if "no_obj_embed_spatial" in state else "SAM 2.0 (not 2.1)"
    return f"{version} {name} (width {w.shape[0]}, {depth} blocks)"


def load_sam2_weights(model: SAM2Base, path: Path, arch: str, official: Optional[str] = None) -> None:
    """Load an official SAM 2.1 checkpoint (``{"model": state_dict}``) into ``model``, strictly.

    ``official``: the official file name for ``arch`` (named in the error messages; default
    from ``configs/models/sam2.yaml``).
    """
    path = Path(path)
    official = official or sam2_architectures().get(arch, {}).get("checkpoint") or f"SAM 2.1 {arch} weights"
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM 2.1 checkpoint {path} not found. Put the official {official} ({arch}) into checkpoint/ "
            f"(see checkpoint/README.md), pass --ckpt PATH, or pass --random_weights for a smoke test.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with foreign objects, ...
        raise ValueError(f"cannot read SAM 2.1 checkpoint {path}: {str(e).splitlines()[0]}. "
                         f"Re-download {official} (see checkpoint/README.md).") from None
    if not isinstance(data, dict):
        raise ValueError(f"SAM 2.1 checkpoint {path} holds a {type(data).__name__}, not a dict with a 'model' state dict")
    state = data["model"] if isinstance(data.get("model"), dict) else data
    if "image_encoder.patch_embed.proj.weight" in state:
        raise ValueError(
            f"{path} is a SAM (ViT) checkpoint; the SAM 2 scripts (train_SAM2.py, test_SAM2.py, --module SAMCL_2) "
            f"need the SAM 2.1 weights {official}. For SAM (ViT) use train.py / test.py.")
    if "image_encoder.trunk.patch_embed.proj.weight" not in state:
        raise ValueError(f"{path} is {describe_sam2_state(state)}; the SAM 2 scripts need {official}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path} does not fit --hiera_name {arch}: it is {describe_sam2_state(state)}. "
            f"Pass the matching --hiera_name or the official {official}. ({str(e).splitlines()[0]})") from None


def prefixed_hiera_attention(attn: torch.nn.Module, x: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor) -> torch.Tensor:
    """``sam2``'s MultiScaleAttention.forward on ``x`` (B, H, W, C_in) with P extra key/value tokens
    (B, P, C_out) before the image tokens' own; a q-pooling block pools the queries only (output
    (B, H', W', C_out)), the extra tokens join the unpooled keys and values. With P = 0 the same
    operations as the stock forward (the same result bit for bit)."""
    b, h, w, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1)
    q, k, v = torch.unbind(qkv, 2)  # (B, HW, heads, c)
    if attn.q_pool:
        q = do_pool(q.reshape(b, h, w, -1), attn.q_pool)
        h, w = q.shape[1:3]
        q = q.reshape(b, h * w, heads, -1)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, HW, c)
    if key.shape[1]:
        k = torch.cat([split_heads(key, heads), k], dim=2)
        v = torch.cat([split_heads(value, heads), v], dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v)
    return attn.proj(out.transpose(1, 2).reshape(b, h, w, -1))


@register_backbone("sam2")
class SAM2Backbone(Backbone):
    """Frozen SAM 2.1 split at the selector block of its Hiera trunk (the first global-attention
    block: 5 of Hiera-T)."""

    family = "sam2"
    default_upsample = "bilinear"  # as SAM 2's image predictor
    predictor_logit_limit = 32.0  # SAM2ImagePredictor returns its low-resolution logits clamped to +-32
    architectures = staticmethod(sam2_architectures)
    build_model = staticmethod(build_sam2_model)
    load_weights = staticmethod(load_sam2_weights)

    def __init__(
        self,
        model: SAM2Base,
        arch: str,
        selector_layer: Optional[int] = None,
        heat_orientation: str = "reference",
        upsample: str = "bilinear",
        attention: str = "chunked",
    ) -> None:
        super().__init__(arch, heat_orientation, upsample)
        self.attention_path = "sdpa"  # Hiera's own scaled_dot_product_attention whatever ``attention`` asks
        self.sam2 = model
        trunk = model.image_encoder.trunk
        self.depth = len(trunk.blocks)
        self.img_size = int(model.image_size)
        self.selector_layer = self._resolve_selector_layer(selector_layer, self._default_selector(trunk), self.depth)
        self.selector_dim = trunk.blocks[self.selector_layer].dim_out
        self.grid_size = _grid_after(trunk, self.img_size, self.selector_layer)
        self.embedding_channels = int(model.sam_prompt_encoder.embed_dim)
        # trunk outputs (stage ends) the FPN neck takes, as Hiera.forward collects them
        self._outputs = [i for i in range(self.depth)
                         if i == trunk.stage_ends[-1] or (i in trunk.stage_ends and trunk.return_interm_layers)]
        self._prefix_outputs = [i for i in self._outputs if i < self.selector_layer]
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @staticmethod
    def _default_selector(trunk: torch.nn.Module) -> int:
        """First global-attention block (block 5 of Hiera-T); without any, the middle of the longest stage."""
        if trunk.global_att_blocks:
            return int(min(trunk.global_att_blocks))
        starts = [0] + [e + 1 for e in trunk.stage_ends[:-1]]
        start, end = max(zip(starts, trunk.stage_ends), key=lambda se: se[1] - se[0])
        return start + (end - start) // 2

    # -------------------------------------------------------------- geometry and injection points
    def block(self, i: int) -> torch.nn.Module:
        return self.sam2.image_encoder.trunk.blocks[i]

    def geometry(self, i: int) -> BlockGeometry:
        blk = self.block(i)
        return BlockGeometry(width=blk.dim_out, keeps_shape=blk.dim == blk.dim_out and not blk.q_stride,
                             window=blk.window_size)

    @property
    def input_multiple(self) -> int:
        """The patch stride times what the windows and q-pooling need (:func:`_check_input_size`)."""
        trunk = self.sam2.image_encoder.trunk
        return trunk.patch_embed.proj.stride[0] * math.lcm(trunk.window_spec[0], 2 ** len(trunk.q_pool_blocks))

    def block_plans(self, img_size: int) -> List[BlockPlan]:
        """Every trunk block at an ``img_size`` input (its own grid, q-pooling and windows; SDPA attention)."""
        trunk = self.sam2.image_encoder.trunk
        grid = _grid_after(trunk, img_size, -1)
        plans = []
        for blk in trunk.blocks:
            stride = blk.q_stride[0] if blk.q_stride else 1
            w = blk.window_size
            plans.append(BlockPlan(grid_in=grid, grid_out=grid // stride, width_in=blk.dim, width_out=blk.dim_out,
                                   heads=blk.attn.num_heads, window=w, padded=padded_side(grid, w), q_stride=stride,
                                   attention="sdpa"))
            grid //= stride
        return plans

    def prefix_elements(self, img_size: int) -> int:
        """The selector block's tokens and the earlier stage ends the neck needs."""
        plans = self.block_plans(img_size)
        return sum(plans[i].grid_out ** 2 * plans[i].width_out for i in self._prefix_outputs + [self.selector_layer])

    def prefixed_attention(self, i: int) -> PrefixedAttention:
        """:func:`prefixed_hiera_attention` of block i's attention (in windowed blocks, per window)."""
        return partial(prefixed_hiera_attention, self.attention(i))

    @property
    def mask_decoder(self) -> torch.nn.Module:
        return self.sam2.sam_mask_decoder

    @property
    def low_res_size(self) -> int:
        return int(self.sam2.sam_prompt_encoder.mask_input_size[0])

    # -------------------------------------------------------------- forward
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) float 0..255 -> 0..1, ImageNet mean/std normalised (SAM2Transforms)."""
        return (images.float() / 255.0 - self.pixel_mean) / self.pixel_std

    def prefix(self, images: torch.Tensor) -> Features:
        """(N, 3, S, S) float 0..255 -> {"tokens": (N, G, G, C) selector-block output,
        "trunk_<i>": (N, C_i, H_i, W_i) outputs of the earlier stage ends the neck needs}."""
        trunk = self.sam2.image_encoder.trunk
        x = trunk.patch_embed(self.preprocess(images))
        x = x + trunk._get_pos_embed(x.shape[1:3])
        prefix: Features = {}
        for i, blk in enumerate(trunk.blocks[: self.selector_layer + 1]):
            x = blk(x)
            if i in self._prefix_outputs:
                prefix[f"trunk_{i}"] = x.permute(0, 3, 1, 2)
        prefix["tokens"] = x
        return prefix

    def encode_suffix(self, prefix: Features) -> Features:
        """Remaining trunk blocks, FPN neck, and set_image's feature preparation.

        Returns {"image_embed": (N, D, G, G), "high_res_0": (N, D/8, 4G, 4G),
        "high_res_1": (N, D/4, 2G, 2G)} (D = 256 and G = 64 for Hiera-T at 1024);
        without high-res features in the decoder only "image_embed".
        """
        model = self.sam2
        enc = model.image_encoder
        x = prefix["tokens"]
        outputs = [prefix[f"trunk_{i}"] for i in self._prefix_outputs]
        if self.selector_layer in self._outputs:
            outputs.append(x.permute(0, 3, 1, 2))
        for i in range(self.selector_layer + 1, self.depth):
            x = enc.trunk.blocks[i](x)
            if i in self._outputs:
                outputs.append(x.permute(0, 3, 1, 2))
        # ImageEncoder.forward after the trunk
        features, pos = enc.neck(outputs)
        if enc.scalp > 0:
            features, pos = features[: -enc.scalp], pos[: -enc.scalp]
        backbone_out = {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}
        # SAM2Base.forward_image
        if model.use_high_res_features_in_sam:
            backbone_out["backbone_fpn"][0] = model.sam_mask_decoder.conv_s0(backbone_out["backbone_fpn"][0])
            backbone_out["backbone_fpn"][1] = model.sam_mask_decoder.conv_s1(backbone_out["backbone_fpn"][1])
        # SAM2ImagePredictor.set_image_batch
        _, vision_feats, _, feat_sizes = model._prepare_backbone_features(backbone_out)
        if model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
        n = x.shape[0]
        feats = [f.permute(1, 2, 0).view(n, -1, *size) for f, size in zip(vision_feats, feat_sizes)]
        out: Features = {"image_embed": feats[-1]}
        for k, f in enumerate(feats[:-1]):
            out[f"high_res_{k}"] = f
        return out

    def decode(self, features: Features, points: torch.Tensor, labels: torch.Tensor,
               boxes: Optional[torch.Tensor] = None, low_res: bool = False,
               mask_decoder: Optional[torch.nn.Module] = None,
               options: Optional[DecodeOptions] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """As ``SAM2ImagePredictor._predict`` with one prompt set per image, batched.

        Args:
            features: from :meth:`encode_suffix`; points: (N, P, 2) (x, y) in the S x S
                frame; labels: (N, P) (1 foreground, 0 background, -1 padding); P = 0: no points.
            boxes: (N, 4) box prompts, with the points (``options.points_with_box``) only.
            options: multimask output (the decoder's own: three masks; without it, in eval mode,
                the single mask or the most stable of the three), mask prompt (:class:`DecodeOptions`).
        Returns:
            mask logits (N, C, S, S) (bilinear from the decoder's 4G x 4G; ``low_res``: those
            4G x 4G logits) and IoU (N, C); C = 3 with ``options.multimask``, else 1.
        """
        opts = options or DecodeOptions()
        if boxes is not None and not opts.points_with_box:
            raise ValueError("box prompts (prompt: box) are CAD's recipe, for SAM (ViT) backbones only")
        model = self.sam2
        pe = model.sam_prompt_encoder
        # the predictor normalises coordinates by the image frame, then scales to image_size
        coords = points.float() / self.img_size * model.image_size
        if boxes is not None:  # as the predictor: the box's corners are points labelled 2 and 3, before the points
            corners = boxes.float().reshape(-1, 2, 2) / self.img_size * model.image_size
            coords = torch.cat([corners, coords], dim=1)
            labels = torch.cat([labels.new_tensor([[2, 3]]).expand(corners.shape[0], 2), labels], dim=1)
        sparse, dense = pe(points=(coords, labels) if coords.shape[1] > 0 else None, boxes=None,
                           masks=opts.mask_input)
        n = features["image_embed"].shape[0]
        if sparse.shape[0] != n:  # no prompt at all: the encoder makes one empty set
            sparse = sparse.expand(n, -1, -1)
        high_res = [features[f"high_res_{k}"] for k in range(sum(k.startswith("high_res_") for k in features))]
        decoder = model.sam_mask_decoder if mask_decoder is None else mask_decoder
        logits, iou, _, _ = decoder(
            image_embeddings=features["image_embed"],
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=opts.multimask,
            repeat_image=False,  # one prompt set per image: no cross-multiplication
            high_res_features=high_res or None,
        )
        return (logits.float() if low_res else self.upsample_logits(logits)), iou
