"""The model input side: the recipes leave it to the architecture (img_size null), so the published
setting is 1024 and the tiny test backbones keep their own 128, unless a flag or a recipe gives one."""
import pytest
import torch

from samcl.backbones.build import backbone_family
from samcl.config import CONFIG_DIR, load_config

RECIPES = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml")
                 if p.parent.name != "models")


def input_side(cfg) -> int:
    """The side of the model ``cfg`` builds (random weights: the same builder as build_backbone)."""
    torch.manual_seed(0)
    model, _ = backbone_family(cfg.backbone).build_model(cfg.arch_name, cfg.img_size)
    return int(model.image_encoder.img_size if cfg.backbone == "sam" else model.image_size)


@pytest.mark.parametrize("recipe", RECIPES)
def test_no_recipe_fixes_the_input_side(recipe):
    assert load_config(str(CONFIG_DIR / recipe)).img_size is None


@pytest.mark.parametrize("recipe, arch", [("samcl_vit_b.yaml", "vit_b"), ("samcl2_hiera_t.yaml", "hiera_t")])
def test_the_published_setting_is_1024(recipe, arch):
    cfg = load_config(str(CONFIG_DIR / recipe))
    assert cfg.arch_name == arch and input_side(cfg) == 1024


@pytest.mark.parametrize("recipe, size_flag", [("samcl_vit_b.yaml", "vit_name"), ("samcl2_hiera_t.yaml", "hiera_name")])
def test_a_tiny_backbone_keeps_its_own_input_side_unless_one_is_given(recipe, size_flag, tmp_path):
    tiny = {"vit_name": "vit_tiny", "hiera_name": "hiera_toy"}[size_flag]
    assert input_side(load_config(str(CONFIG_DIR / recipe), {size_flag: tiny})) == 128
    assert input_side(load_config(str(CONFIG_DIR / recipe), {size_flag: tiny, "img_size": 64})) == 64  # a flag
    own = tmp_path / "tiny.yaml"  # a recipe naming a tiny size and a side
    own.write_text(f"base: {CONFIG_DIR / recipe}\n{size_flag}: {tiny}\nimg_size: 64\n")
    assert input_side(load_config(str(own))) == 64

