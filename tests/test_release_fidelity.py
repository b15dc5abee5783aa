"""The defaults compute what the release computes, bit for bit on the CPU.

Each ``release_*`` function below is a literal transcription of the release's code
(INV-WZQ/SAMCL: datasets/dataset.py, utils.py, module/SAMCL*.py, train*.py), written
from reading it and independent of this project's code; each test compares it with
ours on small inputs.
"""
import copy

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sam2.utils.transforms import SAM2Transforms
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from samcl import pipeline
from samcl.backbones.sam2 import SAM2Backbone, build_sam2_model
from samcl.config import CONFIG_DIR, load_config
from samcl.continual import ContinualTrainer
from samcl.data import SegmentationSplit, load_mask
from samcl.demo import make_demo_data
from samcl.heatmap import points_to_heatmap
from samcl.losses import focal_loss, samcl_loss
from samcl.selector import ModuleSelector
from tests.conftest import SAMPLE

# ---------------------------------------------------------------- transcriptions of the release


def release_image(path, size):
    """datasets/dataset.py: PIL open, convert('RGB'), transforms.Resize((size, size)) on the PIL
    image, then (SAM) np.array -> float32 -> CHW."""
    img = Image.open(path).convert("RGB")
    img = transforms.Resize((size, size))(img)
    return torch.from_numpy(np.array(img).astype(np.float32)).permute(2, 0, 1), img


def release_mask(path, size):
    """datasets/dataset.py: convert('L'), Resize NEAREST, then (np.array(label) / 255).astype(int32)."""
    mask = Image.open(path).convert("L")
    mask = transforms.Resize((size, size), interpolation=InterpolationMode.NEAREST)(mask)
    return torch.from_numpy((np.array(mask) / 255).astype(np.int32).astype(np.float32)), np.array(mask)


def release_loss(pred_masks, gt_masks, iou_predictions):
    """utils.train: FocalLoss, DiceLoss and calc_iou per image, accumulated in a loop."""
    num_masks = sum(len(pred_mask) for pred_mask in pred_masks)
    loss_focal, loss_dice, loss_iou = torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)
    for pred_mask, gt_mask, iou_prediction in zip(pred_masks, gt_masks, iou_predictions):
        # calc_iou
        pm = (pred_mask >= 0.5).float()
        intersection = torch.sum(torch.mul(pm, gt_mask), dim=(1, 2))
        union = torch.sum(pm, dim=(1, 2)) + torch.sum(gt_mask, dim=(1, 2)) - intersection
        batch_iou = (intersection / (union + 1e-7)).unsqueeze(1)
        # FocalLoss
        inputs = torch.clamp(F.sigmoid(pred_mask), min=0, max=1).view(-1)
        targets = gt_mask.float().view(-1)
        bce = F.binary_cross_entropy(inputs, targets, reduction="none")
        loss_focal += (0.8 * (1 - torch.exp(-bce)) ** 2 * bce).mean()
        # DiceLoss
        inputs = torch.clamp(F.sigmoid(pred_mask), min=0, max=1).view(-1)
        targets = gt_mask.reshape(-1)
        intersection = (inputs * targets).sum()
        loss_dice += 1 - (2.0 * intersection + 1) / (inputs.sum() + targets.sum() + 1)
        if batch_iou.dim() == 2:
            batch_iou = batch_iou.squeeze(0)
        loss_iou += F.mse_loss(iou_prediction, batch_iou, reduction="sum") / num_masks
    return loss_focal + 10 * loss_dice + loss_iou


def release_heatmap(points, grid=64):
    """utils.generate_heatmap((9, 9), points, 64, 64), then .float() as the modules call it."""
    out = []
    for pts in points:
        img = np.zeros((grid, grid))
        for x, y in pts:
            x, y = int(int(x) * grid / 1024), int(int(y) * grid / 1024)
            img[x][y] = 1
        out.append(torch.tensor(cv2.GaussianBlur(img, (9, 9), 0) * 255).unsqueeze(0))
    return torch.cat(out).float()


def release_embedding(tokens):
    """image_encoder / hieradet forward at the selector layer: permute, two means, tolist, tensor."""
    embed = tokens.detach().permute(0, 3, 1, 2).mean(-1).mean(-1).tolist()
    return torch.tensor(embed)


def release_route(selector, embedding):
    """train.py: F.softmax(output, dim=1).max(dim=1)[1] in eval mode."""
    selector.eval()
    return F.softmax(selector(embedding), dim=1).max(dim=1)[1]


# ---------------------------------------------------------------- images and masks


def write_pair(folder, name, size, ext, seed):
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
    img = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)  # texture: resizing matters
    mask = ((xx - w / 2) ** 2 / (w / 3) ** 2 + (yy - h / 2) ** 2 / (h / 3) ** 2 <= 1).astype(np.uint8) * 255
    mask[h // 2, : w // 3] = 200  # an anti-aliased edge value
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(folder / "images" / f"{name}{ext}", quality=90)
    Image.fromarray(mask).save(folder / "masks" / f"{name}.png")
    return f"{name}.png"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A downscaled and an upscaled image, JPEG and PNG, with masks and points."""
    import json

    root = tmp_path_factory.mktemp("pairs")
    names = [write_pair(root, "down_jpg", (613, 421), ".jpg", 0), write_pair(root, "up_png", (97, 143), ".png", 1),
             write_pair(root, "down_png", (530, 300), ".png", 2), write_pair(root, "up_jpg", (120, 80), ".jpg", 3)]
    (root / "masks" / "points.json").write_text(json.dumps({n: [[[10, 20]], [1]] for n in names}))
    return root


@pytest.mark.parametrize("size", [256, 1024])
def test_image_and_mask_equal_the_releases_pil_pipeline(pairs, size):
    ds_ref = SegmentationSplit(pairs, size, mask_binarize="reference")
    ds_default = SegmentationSplit(pairs, size)
    for i, (img_path, mask_path) in enumerate(ds_ref.pairs):
        want_img, _ = release_image(img_path, size)
        want_mask, raw = release_mask(mask_path, size)
        item = ds_ref[i]
        assert item["image"].dtype == torch.uint8
        assert torch.equal(item["image"].float(), want_img), img_path.name
        assert torch.equal(item["mask"][0], want_mask), mask_path.name
        # the default binarisation thresholds the same PIL-resized mask at 128 (quirk Q5)
        assert torch.equal(ds_default[i]["mask"][0], torch.from_numpy((raw >= 128).astype(np.float32)))
        assert torch.equal(torch.from_numpy(load_mask(mask_path, size, "reference")).float(), want_mask)


def test_real_sample_images_equal_the_releases_pipeline():
    if not SAMPLE.exists():
        pytest.skip(f"reference data {SAMPLE} is absent (it lives in ../shared/reference beside the repo)")
    checked = 0
    for domain in ("CAMO", "Kvasir"):  # a 4252x2835 photograph (shrunk) and upscaled endoscopy images
        ds = SegmentationSplit(SAMPLE / "data" / domain / "test", 1024, mask_binarize="reference")
        for i in range(2):
            img_path, mask_path = ds.pairs[i]
            item = ds[i]
            assert torch.equal(item["image"].float(), release_image(img_path, 1024)[0]), img_path
            assert torch.equal(item["mask"][0], release_mask(mask_path, 1024)[0]), mask_path
            checked += 1
    assert checked == 4


def test_sam2_input_equals_sam2transforms_on_the_pil_resized_image(pairs):
    torch.manual_seed(0)
    model, _ = build_sam2_model("hiera_toy")
    bb = SAM2Backbone(model, "hiera_toy")
    for size in (bb.img_size, 1024):
        ds = SegmentationSplit(pairs, size)
        for i, (img_path, _) in enumerate(ds.pairs):
            _, pil = release_image(img_path, size)
            want = SAM2Transforms(size, 0)(pil)  # ToTensor (/255), tensor Resize (a no-op here), Normalize
            assert torch.equal(bb.preprocess(ds[i]["image"][None].float())[0], want), img_path.name


# ---------------------------------------------------------------- loss


def loss_inputs(seed=0, n=3, h=24, w=20):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 1, h, w, generator=g) * 6
    logits[0, 0, :4] = 25.0  # saturated: sigmoid is exactly 1.0 in fp32
    logits[1, 0, -4:] = -120.0  # saturated towards 0
    gt = (torch.rand(n, 1, h, w, generator=g) > 0.5).long()
    gt[0, 0, :2] = 0  # confidently wrong pixels
    gt[1, 0, -2:] = 1
    gt[2] = 0  # a mask with no foreground
    logits[2] = -5.0  # ... and no prediction: the IoU target is 0 / (0 + 1e-7) = 0
    iou_pred = torch.rand(n, 1, generator=g)
    return logits, gt, iou_pred


@pytest.mark.parametrize("shape", [(3, 24, 20), (3, 1024, 1024)])
def test_loss_and_gradients_equal_the_releases_loop(shape):
    n, h, w = shape
    logits, gt, iou_pred = loss_inputs(n=n, h=h, w=w)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    pa, pb = iou_pred.clone().requires_grad_(True), iou_pred.clone().requires_grad_(True)
    ours = samcl_loss(a, pa, gt.float())
    want = release_loss(b, gt, pb)
    assert torch.equal(ours, want), (ours.item(), want.item())
    ours.backward()
    want.backward()
    assert torch.equal(a.grad, b.grad) and torch.equal(pa.grad, pb.grad)


def test_saturated_wrong_pixels_cost_100_and_pass_no_gradient():
    # sigmoid(25) is exactly 1.0 in fp32 and sigmoid(-120) exactly 0.0 (sigmoid(-30) is not: 9e-14)
    logits = torch.tensor([[[[25.0, -120.0, -30.0, 0.0, 3.0]]]], requires_grad=True)
    gt = torch.tensor([[[[0.0, 1.0, 1.0, 1.0, 0.0]]]])
    bce = F.binary_cross_entropy(torch.sigmoid(logits), gt, reduction="none")
    assert bce[0, 0, 0, :3].tolist() == [100.0, 100.0, 30.0]  # the log is clamped at -100
    focal_loss(logits, gt).sum().backward()
    assert logits.grad[0, 0, 0, :2].tolist() == [0.0, 0.0]
    assert (logits.grad[0, 0, 0, 2:] != 0).all()


def test_focal_logits_switch_is_bce_with_logits():
    logits, gt, _ = loss_inputs()
    x = logits.clone().requires_grad_(True)
    ours = focal_loss(x, gt.float(), form="logits")
    bce = F.binary_cross_entropy_with_logits(logits, gt.float(), reduction="none")
    want = torch.stack([(0.8 * (1 - torch.exp(-b)) ** 2 * b).view(-1).mean() for b in bce])
    assert torch.equal(ours.detach(), want)
    # hand case, two confidently wrong pixels: BCE from logits is the logit itself (unbounded);
    # the reference's is 100 for both (log clamped), so focal = 0.8 * 100 per pixel
    wrong, bg = torch.tensor([[[[25.0, 200.0]]]]), torch.zeros(1, 1, 1, 2)
    assert focal_loss(wrong, bg, form="logits").item() == pytest.approx(0.8 * (25 + 200) / 2)
    assert focal_loss(wrong, bg).item() == pytest.approx(0.8 * 100)
    ours.sum().backward()
    assert (x.grad[0, 0, :2] != 0).all()  # ... and a gradient there
    with pytest.raises(ValueError, match="focal must be one of"):
        focal_loss(logits, gt.float(), form="nope")


# ---------------------------------------------------------------- heatmap, embedding, routing


def test_heatmap_equals_the_float64_opencv_computation_cast_to_float32():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 6))
        pts = rng.uniform(0, 1023.9, (2, n, 2)).astype(np.float32)
        if trial % 2:
            pts = rng.uniform(0, 40, (2, n, 2)).astype(np.float32)  # near the border: reflect-101
        ours = points_to_heatmap(torch.from_numpy(pts), 64, 1024)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, release_heatmap(pts)), pts


def test_selector_embedding_and_routing_equal_the_releases(tiny_sam):
    torch.manual_seed(0)
    model, _ = build_sam2_model("hiera_toy")
    sam2 = SAM2Backbone(model, "hiera_toy").eval()
    for bb in (tiny_sam, sam2):
        images = torch.randint(0, 256, (4, 3, bb.img_size, bb.img_size)).float()
        prefix = bb.encode_prefix(images)
        emb = bb.selector_embedding(prefix)
        assert torch.equal(emb, release_embedding(prefix["tokens"]))
        selector = ModuleSelector(bb.selector_dim, 3)
        selector.train()
        selector(torch.randn(16, bb.selector_dim))  # move the BatchNorm running statistics
        assert torch.equal(selector.route(emb), release_route(copy.deepcopy(selector), emb))
        probs = selector.probabilities(emb)
        assert probs.shape == (4, 3) and torch.allclose(probs.sum(1), torch.ones(4))


# ---------------------------------------------------------------- the training protocol


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root, n_train=4, n_test=2)
    return root


def run_cfg(root, config, **kw):
    return load_config(CONFIG_DIR / config, {
        "data_root": str(root), "output_dir": str(root / "log"), "epoch": 3, "num_embedding": 2,
        "batch_size": 2, "selector_epochs": 1, "order": "polyp_shadow", "unseen": [], **kw})


@pytest.mark.parametrize("policy, expected", [("reference", [True, False, False]),
                                              ("every_epoch", [True, True, True])])
def test_sam2_decoder_mode_after_validation(demo, tmp_path, monkeypatch, policy, expected):
    """The release trains in eval mode after its first validation (utils.validate sets eval and
    nothing sets train again); SAM 2's decoder then picks its mask by stability."""
    cfg = run_cfg(demo, "demo_sam2.yaml", val_every=1, order="polyp", train_mode=policy,
                  run_dir=str(tmp_path / policy))
    seen = []
    build = pipeline.build_model

    def build_and_watch(*a, **k):
        model = build(*a, **k)
        model.backbone.sam2.sam_mask_decoder.register_forward_pre_hook(
            lambda m, _i: seen.append(m.training) if torch.is_grad_enabled() else None)
        return model

    monkeypatch.setattr(pipeline, "build_model", build_and_watch)
    pipeline.train(cfg, torch.device("cpu"))
    per_epoch = [seen[2 * e: 2 * e + 2] for e in range(3)]  # 4 images, batch 2: two training steps an epoch
    assert len(seen) == 6 and [set(s) for s in per_epoch] == [{m} for m in expected]


@pytest.mark.parametrize("init, same", [("shared", True), ("per_domain", False)])
def test_every_domain_starts_from_the_same_module(demo, tmp_path, monkeypatch, init, same):
    cfg = run_cfg(demo, "demo_sam.yaml", epoch=1, val_every=0, module_init=init, run_dir=str(tmp_path / init))
    starts = []
    train_module = ContinualTrainer._train_module

    def record(self, domain, module, loader):
        starts.append({k: v.clone() for k, v in module.state_dict().items()})
        return train_module(self, domain, module, loader)

    monkeypatch.setattr(ContinualTrainer, "_train_module", record)
    pipeline.train(cfg, torch.device("cpu"))
    assert len(starts) == 2 and starts[0].keys() == starts[1].keys()
    equal = [torch.equal(starts[0][k], starts[1][k]) for k in starts[0]]
    assert all(equal) if same else not all(equal)
    assert torch.equal(starts[0]["B.0.weight"], torch.zeros_like(starts[0]["B.0.weight"]))  # zero-init either way


# ---------------------------------------------------------------- the selector across domains


class ReleaseMLP(torch.nn.Module):
    """utils.MLP: the release's selector, built once with ``class_num`` outputs."""

    def __init__(self, embedding_dim, class_num=1):
        super().__init__()
        self.layer1 = torch.nn.Linear(embedding_dim, embedding_dim)
        self.norm1 = torch.nn.BatchNorm1d(embedding_dim)
        self.layer2 = torch.nn.Linear(embedding_dim, embedding_dim // 4)
        self.norm2 = torch.nn.BatchNorm1d(embedding_dim // 4)
        self.layer3 = torch.nn.Linear(embedding_dim // 4, embedding_dim // 4)
        self.norm3 = torch.nn.BatchNorm1d(embedding_dim // 4)
        self.layer4 = torch.nn.Linear(embedding_dim // 4, class_num)

    def forward(self, x):
        out = self.norm1(self.layer1(x))
        out = F.relu(self.norm2(self.layer2(out)))
        out = F.relu(self.norm3(self.layer3(out)))
        return self.layer4(out)


class ReleaseEmbeddings(torch.utils.data.Dataset):
    """utils.CustomDataset: (embedding, domain key) pairs -> (float32 tensor, int64 label)."""

    def __init__(self, data, map_dict):
        self.data, self.map_dict = data, map_dict.copy()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        return (torch.tensor(self.data[idx][0], dtype=torch.float32),
                torch.tensor(self.map_dict[self.data[idx][1]], dtype=torch.int64))


class Shuffle(torch.utils.data.Sampler):
    """The one input fed to the transcription: the shuffle order. The release's ``shuffle=True``
    draws it from the global generator; here one permutation per epoch from ``generator``, the
    draw this project makes, so that both see the same batches."""

    def __init__(self, n, generator):
        self.n, self.generator = n, generator

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self):
        return self.n


def release_selector_run(embeddings, order, seed):
    """train.py's selector over the order: MLP(dim, class_num=len(order)) built before the first
    domain; after each domain the domain's embeddings are appended to ``Embedding`` and the same
    MLP is trained 25 epochs with a fresh SGD(lr 0.01) on all of them, batches of min(len, 24),
    the last partial one dropped (utils.train_embed). Returns the state after each domain."""
    key_to_index = {key: index for index, key in enumerate(order)}
    torch.manual_seed(seed + 1000)  # the parameters both start from: this project's draw for the head
    model = ReleaseMLP(embeddings[order[0]].shape[1], class_num=len(key_to_index))
    Embedding, states = [], []
    for id, key in enumerate(order):
        for index in range(len(embeddings[key])):
            Embedding.append((embeddings[key][index], key))
        dataset = ReleaseEmbeddings(Embedding, key_to_index)
        loader = torch.utils.data.DataLoader(dataset, batch_size=min(len(dataset), 24), drop_last=True,
                                             sampler=Shuffle(len(dataset), torch.Generator().manual_seed(seed + id)))
        optimizer = torch.optim.SGD(params=model.parameters(), lr=0.01)
        model.train()
        for epoch in range(25):
            model.train()
            for input, target in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(input), target)
                loss.backward()
                optimizer.step()
        states.append(copy.deepcopy(model.state_dict()))
    return states


def samcl_selector_run(embeddings, order, seed, head, run_dir):
    """This project's SAMCL method fitting its selector after each domain of ``order``."""
    from types import SimpleNamespace

    from samcl.methods.samcl import SAMCL
    from samcl.selector import EmbeddingBuffer

    dim = embeddings[order[0]].shape[1]
    cfg = SimpleNamespace(seed=seed, selector_lr=0.01, selector_epochs=25, selector_batch_size=24,
                          selector_head=head, domains=list(order), selector="mlp", unseen_embeddings="train")
    model = SimpleNamespace(selector=None, backbone=SimpleNamespace(selector_dim=dim), domains=[])
    buffer = EmbeddingBuffer(10_000)
    method = SAMCL(cfg, model, torch.device("cpu"), buffer, run_dir)
    states = []
    for t, key in enumerate(order):
        buffer.add(key, embeddings[key])
        model.domains.append(key)
        method._fit_selector(t)
        states.append(copy.deepcopy(model.selector.state_dict()))
    return states


@pytest.fixture
def one_thread():
    """Small CPU work runs fastest (and rounds the same) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # utils.CustomDataset's torch.tensor(tensor)
def test_a_full_selector_head_trains_as_the_releases_bit_for_bit_over_three_domains(tmp_path, one_thread):
    g = torch.Generator().manual_seed(0)
    order = ["Kvasir", "camo", "COCO"]
    # 30, 20 and 25 embeddings of 32 dims around three centres: batches of 24 with partial ones dropped
    embeddings = {k: torch.randn(1, 32, generator=g) * 3 + torch.randn(n, 32, generator=g)
                  for k, n in zip(order, (30, 20, 25))}
    release = release_selector_run(embeddings, order, seed=7)
    ours = samcl_selector_run(embeddings, order, 7, "full", tmp_path / "full")
    for step, (a, b) in enumerate(zip(release, ours)):
        assert a.keys() == b.keys()
        assert b["layer4.weight"].shape == (3, 8)  # one output per domain of the order from the first step
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"after {order[step]}: {different}"
    grown = samcl_selector_run(embeddings, order, 7, "grow", tmp_path / "grow")
    assert [s["layer4.weight"].shape[0] for s in grown] == [1, 2, 3]
    assert not torch.equal(grown[-1]["layer1.weight"], ours[-1]["layer1.weight"])  # the two heads diverge
    from samcl.run_folder import load_selector

    selector, domains = load_selector(tmp_path / "full" / "selector" / "after_Kvasir.safetensors")
    assert domains == ["Kvasir"] and selector.num_domains == 3  # the head's size is the file's


def test_a_full_head_routes_untrained_domains_to_the_frozen_model_and_counts_them(tiny_sam, one_thread):
    """Consulted with one trained domain: an argmax naming a domain not trained yet gives choice -1
    (the frozen model), which the evaluation counts and the selector's accuracy counts as wrong."""
    from samcl.evaluation import evaluate_split, routed, selector_accuracy
    from samcl.learning_modules.augmodule import AugModuleSpec
    from samcl.model import ModuleBank

    bank = ModuleBank(tiny_sam, AugModuleSpec.for_backbone(tiny_sam))
    torch.manual_seed(1)
    bank.add_domain("Kvasir", bank.new_module())
    bank.selector = ModuleSelector(tiny_sam.selector_dim, 3).eval()
    with torch.no_grad():  # the head's bias alone decides: images 0, 1 -> Kvasir, 2 -> camo (untrained), 3 -> COCO
        bank.selector.layer4.weight.zero_()
    images = torch.rand(4, 3, tiny_sam.img_size, tiny_sam.img_size) * 255
    prefix = tiny_sam.encode_prefix(images)
    biases = {0: [5.0, 0, 0], 1: [5.0, 0, 0], 2: [0, 5.0, 0], 3: [0, 0, 5.0]}
    choices = []
    for i in range(4):
        bank.selector.layer4.bias.data = torch.tensor(biases[i])
        choices.append(int(bank.route({k: v[i: i + 1] for k, v in prefix.items()})))
    assert choices == [0, 0, -1, -1]
    bank.selector.layer4.bias.data = torch.tensor([0.0, 5.0, 0.0])
    points = torch.full((4, 1, 2), tiny_sam.img_size / 2)
    labels = torch.ones(4, 1, dtype=torch.long)
    from samcl.data import collate

    items = [{"image": images[i], "mask": torch.zeros(1, tiny_sam.img_size, tiny_sam.img_size), "points": points[i],
              "labels": labels[i], "name": str(i), "index": i} for i in range(4)]
    loader = torch.utils.data.DataLoader(items, batch_size=4, collate_fn=collate)
    res = evaluate_split(bank, loader, torch.device("cpu"), routed(bank))
    assert res["selector_counts"] == {"Kvasir": 0} and res["selector_untrained"] == 4
    assert selector_accuracy(res["selector_counts"], "Kvasir", res["selector_untrained"]) == 0.0
    vanilla = bank.segment_vanilla(prefix, points, labels)[0]
    assert torch.equal(bank.segment_routed(prefix, torch.full((4,), -1), points, labels)[0], vanilla)


@pytest.mark.parametrize("config", ["demo_sam.yaml", "demo_sam2.yaml"])
def test_a_run_with_a_full_head_counts_untrained_choices_stores_one_selector_and_grows_on_resume(demo, tmp_path,
                                                                                                  config, one_thread):
    import json

    from samcl.run_folder import load_selector

    run = tmp_path / "run"
    cfg = run_cfg(demo, config, epoch=1, val_every=0, selector_epochs=2, selector_head="full",
                  order="polyp_natural_shadow", unseen=["natural"], run_dir=str(run))
    metrics = pipeline.train(cfg, torch.device("cpu"))
    steps = metrics["steps"]
    assert load_selector(run / "selector" / "after_polyp.safetensors")[0].num_domains == 3
    for step, evaluated in zip(steps, (["polyp", "natural"], ["polyp", "natural", "shadow"], ["polyp", "natural",
                                                                                               "shadow"])):
        assert list(step["evaluation"]) == evaluated
        for res in step["evaluation"].values():  # every test image counted once: a domain so far or an untrained one
            assert sum(res["selector_counts"].values()) + res.get("selector_untrained", 0) == 2
        # the key is there while the head has outputs for domains not trained yet
        assert all(("selector_untrained" in r) == (step["domain"] != "shadow") for r in step["evaluation"].values())
    # storage: the two modules, the three domains' embeddings, one selector; the snapshots are a record
    size = {p.relative_to(run).as_posix(): p.stat().st_size for p in run.rglob("*.safetensors")}
    kept = ["polyp.safetensors", "shadow.safetensors", "Module_Selector.safetensors",
            *(f"embedding_buffer/{d}.safetensors" for d in ("polyp", "natural", "shadow"))]
    assert steps[-1]["storage"]["kept_bytes"] == sum(size[f] for f in kept)
    assert steps[-1]["storage"]["extra_bytes"] == sum(size[f"selector/after_{d}.safetensors"]
                                                      for d in ("polyp", "natural", "shadow"))
    # a resume that appends a domain grows the head; the finished outputs keep their weights
    before = load_selector(run / "Module_Selector.safetensors")[0]
    pipeline.resume(run, {"order": "polyp_natural_shadow_lesion"}, torch.device("cpu"))
    after, domains = load_selector(run / "Module_Selector.safetensors")
    assert domains == ["polyp", "natural", "shadow", "lesion"] and after.num_domains == 4
    last = json.loads((run / "metrics.json").read_text())["steps"][-1]
    assert "selector_untrained" not in last["evaluation"]["lesion"]
    assert before.num_domains == 3
