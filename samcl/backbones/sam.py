"""SAM (ViT) backbone over the installed ``segment_anything`` package."""
from functools import partial
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from ..config import load_model_table
from ..registry import register_backbone
from .attention import prefixed_sam_attention, use_attention
from .base import Backbone, BlockGeometry, BlockPlan, DecodeOptions, Features, PrefixedAttention, padded_side



def sam_architectures() -> dict:
    """Name -> full architecture dict from ``configs/models/sam.yaml``."""
    return load_model_table("sam.yaml")


def build_sam(arch: str, img_size: Optional[int] = None) -> Tuple[Sam, dict]:
    """A randomly initialised ``segment_anything`` Sam of the named architecture."""
    table = sam_architectures()
    if arch not in table:
        raise ValueError(f"unknown SAM architecture {arch!r}; choose from {sorted(table)} (configs/models/sam.yaml)")
    a = dict(table[arch])
    if img_size is not None:
        a["img_size"] = int(img_size)
    if a["img_size"] % a["patch_size"]:
        raise ValueError(f"img_size {a['img_size']} is not a multiple of the patch size {a['patch_size']}")
    grid = a["img_size"] // a["patch_size"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=a["depth"],
            embed_dim=a["embed_dim"],
            img_size=a["img_size"],
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=a["num_heads"],
            patch_size=a["patch_size"],
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(a["global_attn_indexes"]),
            window_size=a["window_size"],
            out_chans=a["prompt_embed_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=a["prompt_embed_dim"],
            image_embedding_size=(grid, grid),
            input_image_size=(a["img_size"], a["img_size"]),
            mask_in_chans=a["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=a["decoder_depth"],
                embedding_dim=a["prompt_embed_dim"],
                mlp_dim=a["decoder_mlp_dim"],
                num_heads=a["decoder_num_heads"],
            ),
            transformer_dim=a["prompt_embed_dim"],
            iou_head_depth=3,
            iou_head_hidden_dim=a["iou_head_hidden_dim"],
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval(), a


def describe_sam_state(state: dict) -> str:
    """Name the SAM size a state dict belongs to, from its shapes (for error messages)."""
    w = state.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        if any(k.startswith(("image_encoder.trunk", "sam_mask_decoder")) for k in state) or "model" in state:
            return "a SAM 2 checkpoint"
        return "not a SAM checkpoint (no image_encoder.patch_embed.proj.weight)"
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    names = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}
    name = names.get((w.shape[0], depth), "an unknown size")
    return f"{name} (width {w.shape[0]}, {depth} blocks)"


def load_sam_weights(sam: Sam, path: Path, arch: str) -> None:
    """Load an official SAM checkpoint (plain state dict) into ``sam``, strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint {path} not found. Download the official {arch} weights into checkpoint/ "
            f"(see checkpoint/README.md), pass --ckpt PATH, or pass --random_weights for a smoke test."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with foreign objects, ...
        raise ValueError(f"cannot read SAM checkpoint {path}: {e}. Re-download it (see checkpoint/README.md).") from e
    if not isinstance(state, dict):
        raise ValueError(f"SAM checkpoint {path} holds a {type(state).__name__}, not a state dict")
    if "model" in state and isinstance(state["model"], dict):
        raise ValueError(f"{path} is a SAM 2 checkpoint; the SAM (ViT) scripts need {arch} weights (sam_vit_b_01ec64.pth)")
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path} does not fit --vit_name {arch}: it is {describe_sam_state(state)}. "
            f"Pass the matching --vit_name or checkpoint. ({str(e).splitlines()[0]})"
        ) from None


# the attention setting -> the block plans' name of its path (the memory estimate's, samcl.memory)
PLAN_ATTENTION = {"stock": "materialised", "chunked": "chunked", "sdpa": "sdpa_rel_pos"}


@register_backbone("sam")
class SAMBackbone(Backbone):
    """Frozen SAM (ViT) split at the selector layer (block depth // 2: 6 of ViT-B)."""

    family = "sam"
    default_upsample = "nearest"  # the release's choice (quirk Q6)
    architectures = staticmethod(sam_architectures)
    build_model = staticmethod(build_sam)
    load_weights = staticmethod(load_sam_weights)

    def __init__(
        self,
        sam: Sam,
        arch: str,
        selector_layer: Optional[int] = None,
        heat_orientation: str = "reference",
        upsample: str = "nearest",
        attention: str = "chunked",
    ) -> None:
        super().__init__(arch, heat_orientation, upsample)
        self.sam = sam
        enc = sam.image_encoder
        use_attention(enc, attention)
        self.attention_path = attention
        self.img_size = enc.img_size
        self.grid_size = enc.img_size // enc.patch_embed.proj.kernel_size[0]
        self.depth = len(enc.blocks)
        self.selector_layer = self._resolve_selector_layer(selector_layer, self.depth // 2, self.depth)
        self.selector_dim = enc.blocks[0].norm1.normalized_shape[0]
        self.embedding_channels = enc.neck[0].out_channels
        self.freeze()

    # -------------------------------------------------------------- geometry and injection points
    def block(self, i: int) -> torch.nn.Module:
        return self.sam.image_encoder.blocks[i]

    def geometry(self, i: int) -> BlockGeometry:
        return BlockGeometry(width=self.selector_dim, keeps_shape=True, window=self.block(i).window_size)

    @property
    def input_multiple(self) -> int:
        return int(self.sam.image_encoder.patch_embed.proj.kernel_size[0])

    def block_plans(self, img_size: int) -> List[BlockPlan]:
        """Every block at an ``img_size`` input: grid S / patch; the attention path of :attr:`attention_path`
        (the stock one: materialised maps)."""
        grid = img_size // self.sam.image_encoder.patch_embed.proj.kernel_size[0]
        plans = []
        for blk in self.sam.image_encoder.blocks:
            w = blk.window_size
            plans.append(BlockPlan(grid_in=grid, grid_out=grid, width_in=self.selector_dim, width_out=self.selector_dim,
                                   heads=blk.attn.num_heads, window=w, padded=padded_side(grid, w),
                                   rel_pos=blk.attn.use_rel_pos,
                                   attention=PLAN_ATTENTION[self.attention_path]))
        return plans

    def prefixed_attention(self, i: int) -> PrefixedAttention:
        """:func:`prefixed_sam_attention` of block i's attention (in windowed blocks, per window)."""
        return partial(prefixed_sam_attention, self.attention(i))

    @property
    def neck(self) -> torch.nn.Module:
        return self.sam.image_encoder.neck

    @property
    def mask_decoder(self) -> torch.nn.Module:
        return self.sam.mask_decoder

    @property
    def low_res_size(self) -> int:
        return int(self.sam.prompt_encoder.mask_input_size[0])

    # -------------------------------------------------------------- forward
    def prefix(self, images: torch.Tensor) -> Features:
        """-> {"tokens": (N, G, G, C) output of the selector block}."""
        enc = self.sam.image_encoder
        x = enc.patch_embed(self.sam.preprocess(images.float()))
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for blk in enc.blocks[: self.selector_layer + 1]:
            x = blk(x)
        return {"tokens": x}

    def encode_suffix(self, prefix: Features) -> Features:
        """-> {"image_embeddings": (N, 256, G, G)}."""
        enc = self.sam.image_encoder
        x = prefix["tokens"]
        for blk in enc.blocks[self.selector_layer + 1:]:
            x = blk(x)
        return {"image_embeddings": enc.neck(x.permute(0, 3, 1, 2))}

    def decode(self, features: Features, points: torch.Tensor, labels: torch.Tensor,
               boxes: Optional[torch.Tensor] = None, low_res: bool = False,
               mask_decoder: Optional[torch.nn.Module] = None,
               options: Optional[DecodeOptions] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``boxes`` (N, 4) (x0, y0, x1, y1) prompt instead of the points (with them:
        ``options.points_with_box``); ``mask_decoder`` replaces SAM's own (a CAD module's fine-tuned
        copy); ``low_res``: the decoder's (N, C, 256, 256) logits, not upsampled; ``options``:
        multimask output, mask prompt (:class:`DecodeOptions`)."""
        opts = options or DecodeOptions()
        pe = self.sam.prompt_encoder
        decoder = self.sam.mask_decoder if mask_decoder is None else mask_decoder
        with_points = points.shape[1] > 0 and (boxes is None or opts.points_with_box)
        sparse, dense = pe(points=(points, labels) if with_points else None, boxes=boxes, masks=opts.mask_input)
        image_pe = pe.get_dense_pe()
        emb = features["image_embeddings"]
        if sparse.shape[0] != emb.shape[0]:  # no prompt at all: the encoder makes one empty set
            sparse = sparse.expand(emb.shape[0], -1, -1)
        # One call for the whole batch, one prompt set per image. The stock
        # decoder repeats its image embedding once per prompt set (images x prompts), so
        # it gets a single zero image and each image's embedding rides in the dense
        # prompt term it adds next: src = repeat(0) + (emb_i + dense_i) = emb_i + dense_i,
        # the same values as one call per image.
        logits, iou = decoder(
            image_embeddings=emb.new_zeros((1,) + emb.shape[1:]),
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=emb + dense,
            multimask_output=opts.multimask,
        )
        return (logits if low_res else self.upsample_logits(logits)), iou
