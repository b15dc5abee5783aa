"""O-LoRA and L2P: the orthogonality loss and the key choice on hand cases, old LoRA pairs frozen,
the summed inference, the prefix attention recomputed exactly as the stock one (and as a literal
formula with prompts) on SAM and SAM 2, and both methods end to end on both backbones."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from samcl import pipeline
from samcl.config import CONFIG_DIR, load_config
from samcl.demo import make_demo_data
from samcl.io import read_tagged
from samcl.loading import Batch
from samcl.methods.finetune import FineTune
from samcl.methods.l2p import L2P
from samcl.methods.olora import OLoRA
from samcl.learning_modules.lora import LoRASpec
from samcl.learning_modules.olora import OLoRAModule, OLoRASpec, orthogonality
from samcl.learning_modules.prompt_pool import PromptPoolSpec, choose, pull_loss
from samcl.plugins import check_plugins
from samcl.training_step import SegmentStep
from tests.conftest import tiny_backbone

CPU = torch.device("cpu")
CONFIGS = {"sam": "demo_sam.yaml", "sam2": "demo_sam2.yaml"}
KIND = {"olora": "olora", "l2p": "prompt_pool"}


@pytest.fixture(scope="module", params=["sam", "sam2"])
def backbone(request):
    return tiny_backbone(request.param)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("olora_l2p")
    make_demo_data(root, n_train=4, n_test=2)
    return root


def cfg_for(data, family, run_dir, method, **kw):
    return check_plugins(load_config(CONFIG_DIR / CONFIGS[family], {
        "data_root": str(data), "run_dir": str(run_dir), "method": method, "learning_module": KIND[method],
        "epoch": 2, "num_embedding": 2, "batch_size": 2, "eval_batch_size": 2, "val_every": 0,
        "order": "polyp_shadow", "unseen": [], "num_workers": 0, **kw}))


def a_batch(bb, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = bb.img_size
    return Batch(images=torch.randint(0, 256, (n, 3, s, s), generator=g).float(),
                 masks=(torch.rand(n, 1, s, s, generator=g) > 0.5).float(),
                 points=torch.rand(n, 3, 2, generator=g) * s, labels=torch.tensor([[1, 1, 0], [1, 0, 1]])[:n],
                 names=[f"im{i}" for i in range(n)])


def attention_inputs(bb, images):
    """The input and stock output of the attention of every block after the selector layer."""
    seen = {}
    handles = [bb.attention(i).register_forward_hook(lambda _m, inp, out, i=i: seen.__setitem__(i, (inp[0], out)))
               for i in range(bb.selector_layer + 1, bb.depth)]
    try:
        with torch.no_grad():
            bb.encode_suffix(bb.encode_prefix(images))
    finally:
        for h in handles:
            h.remove()
    return seen


# ---------------------------------------------------------------------------------------------- O-LoRA
def test_orthogonality_loss_is_the_sum_of_absolute_entries_of_A_old_T_A_new_on_a_hand_case():
    # nn.Linear weights (r = 2, in = 3): the paper's A (in, r) transposed
    old = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    new = torch.tensor([[1.0, 0.0, 1.0], [2.0, -1.0, 0.0]])
    # A_old^T A_new = old @ new^T = [[1, 0], [-1, -1]] -> 3 (not |A_old A_new^T| = old^T @ new, whose sum is 12)
    assert orthogonality(old, new).item() == 3.0
    assert (old.T @ new).abs().sum().item() == 12.0
    # the module: summed over the layers and over every earlier pair against the last one
    spec = OLoRASpec(layers=(0, 1), shapes=((3, 4), (3, 4)), rank=2, alpha=2.0, tasks=3)
    m = OLoRAModule(spec)
    weights = {  # (pair, layer) -> A
        (0, 0): old, (1, 0): [[0, 0, 1], [1, 0, 0]], (2, 0): new,
        (0, 1): [[1, 1, 1], [0, 0, 0]], (1, 1): [[0, 0, 0], [0, 0, 0]], (2, 1): [[1, -1, 1], [1, 1, 1]],
    }
    with torch.no_grad():
        for (k, j), w in weights.items():
            m.pairs[k].A[j].weight.copy_(torch.as_tensor(w, dtype=torch.float32))
    # layer 0: 3 (pair 0) + |[[1, 0], [1, 2]]| = 4 (pair 1); layer 1: |[[1, 3], [0, 0]]| = 4 (pair 0) + 0
    assert m.orthogonality_loss().item() == 11.0
    assert OLoRAModule(OLoRASpec(layers=(0,), shapes=((3, 4),), rank=2, tasks=1)).orthogonality_loss().item() == 0.0


def test_summed_inference_adds_every_pairs_contribution_to_qkv(backbone):
    spec = OLoRASpec.for_backbone(backbone)
    spec = OLoRASpec(**{**spec.to_dict(), "tasks": 3})
    torch.manual_seed(3)
    m = spec.build(backbone)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    hooks = m.hooks(backbone, {})
    assert [t for t, _, _ in hooks] == [backbone.qkv(i) for i in spec.layers]
    for j, (qkv, _kind, fn) in enumerate(hooks):
        x = torch.randn(2, 5, qkv.in_features)
        expected = qkv(x) + spec.alpha / spec.rank * sum(x @ p.A[j].weight.T @ p.B[j].weight.T for p in m.pairs)
        torch.testing.assert_close(fn(qkv, (x,), qkv(x)), expected, rtol=1e-5, atol=1e-5)


def test_a_new_domain_adds_a_pair_the_old_ones_frozen_and_kept_orthogonal(data, tmp_path):
    cfg = cfg_for(data, "sam", tmp_path / "run", "olora", olora_lambda=0.25)
    model = pipeline.build_model(cfg, CPU)
    method = OLoRA(cfg, model, CPU)
    first = method.begin_domain(0, "polyp", trains=True)
    # the first pair is the LoRA finetune draws from the seed
    lora_cfg = check_plugins(load_config(CONFIG_DIR / "demo_sam.yaml",
                                         {"method": "finetune", "learning_module": "lora"}))
    lora = FineTune(lora_cfg, pipeline.build_model(lora_cfg, CPU), CPU).begin_domain(0, "polyp", trains=True)
    assert first.spec.tasks == 1 and type(lora.spec) is LoRASpec
    for j in range(len(first.spec.layers)):
        assert torch.equal(first.pairs[0].A[j].weight, lora.A[j].weight)
        assert torch.equal(first.pairs[0].B[j].weight, lora.B[j].weight) and not first.pairs[0].B[j].weight.any()
    with torch.no_grad():  # as if trained
        for p in first.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    trained = copy.deepcopy(first.state_dict())
    method.end_domain(0, "polyp", first, None)
    assert method.begin_domain(1, "natural", trains=False) is None
    method.end_domain(1, "natural", None, None)
    second = method.begin_domain(2, "shadow", trains=True)
    assert second.spec.tasks == 2 and second is not first and method.current() is second
    assert set(trained) == {k for k in second.state_dict() if k.startswith("pairs.0.")}
    assert all(torch.equal(second.state_dict()[k], v) for k, v in trained.items())  # copied
    assert [p.requires_grad for p in second.pairs[0].parameters()] == [False] * 2 * len(second.spec.layers)
    assert all(p.requires_grad for p in second.pairs[1].parameters())
    assert not any(b.weight.any() for b in second.pairs[1].B)  # the new pair starts as a LoRA: B zero
    opt = method.make_optimizer(second)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in second.pairs[1].parameters()}
    # one training step: no gradient reaches the old pair; the new A's gradient is the orthogonality loss's alone
    # (B is zero, so the segmentation loss gives A none): lambda * sum_old sign(A_old^T A_new)^T A_old per layer
    b = a_batch(model.backbone)
    loss = method.observe(b, model.backbone.encode_prefix(b.images), SegmentStep(model.backbone, second))
    loss.backward()
    assert all(p.grad is None for p in second.pairs[0].parameters())
    assert all(p.grad is not None and p.grad.any() for p in second.pairs[1].B.parameters())
    for a_old, a_new in zip(second.pairs[0].A, second.pairs[1].A):
        expected = 0.25 * torch.sign(a_old.weight @ a_new.weight.T).T @ a_old.weight
        torch.testing.assert_close(a_new.weight.grad, expected)
    opt.step()
    assert all(torch.equal(second.state_dict()[k], v) for k, v in trained.items())


# ---------------------------------------------------------------------------------------------- L2P
def test_the_top_k_keys_by_cosine_similarity_on_a_hand_case():
    keys = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [2.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    query = torch.tensor([[1.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    chosen, sim = choose(query, keys, 3)
    # image 0: cos 0, 1/sqrt2, 1, 1 -> keys 2 and 3 tie at 1 (the lower index first), then key 1
    # image 1: cos 1, 1/sqrt2, 0, 0 -> key 0, key 1, then keys 2 and 3 tie at 0: key 2
    assert chosen.tolist() == [[2, 3, 1], [0, 1, 2]]
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(sim, torch.tensor([[1.0, 1.0, r], [1.0, r, 0.0]]))
    # pull: mean over images of sum (1 - cos) = ((1 - r) + (1 - r + 1)) / 2
    torch.testing.assert_close(pull_loss(sim), torch.tensor((3 - 2 * r) / 2))


def test_the_recomputed_attention_without_prompts_is_the_stock_one_bit_for_bit(backbone):
    images = a_batch(backbone).images
    seen = attention_inputs(backbone, images)
    late = list(range(backbone.selector_layer + 1, backbone.depth))
    assert sorted(seen) == late
    kinds = {(backbone.geometry(i).window > 0, getattr(backbone.attention(i), "q_pool", None) is not None)
             for i in late}
    # the tiny configs have windowed and global late blocks; SAM 2's has a q-pooling one (block 10)
    assert kinds == ({(True, False), (False, False)} if backbone.family == "sam"
                     else {(True, False), (False, False), (True, True)})
    for i, (x, out) in seen.items():
        attn = backbone.attention(i)
        none = x.new_zeros(x.shape[0], 0, attn.qkv.out_features // 3)
        with torch.no_grad():
            assert torch.equal(backbone.prefixed_attention(i)(x, none, none), out), i
    # the whole model with the hooks and no prompt chosen is the stock model
    module = PromptPoolSpec.for_backbone(backbone).build(backbone).eval()
    b = a_batch(backbone)
    prefix = backbone.encode_prefix(b.images)
    with torch.no_grad():
        stock, stock_iou = backbone.segment(prefix, b.points, b.labels)
        with module.attached(backbone, chosen=torch.zeros(2, 0, dtype=torch.long)):
            hooked, hooked_iou = backbone.segment(prefix, b.points, b.labels)
    assert torch.equal(hooked, stock) and torch.equal(hooked_iou, stock_iou)


def literal_attention(attn, x, key, value, rel_pos):
    """softmax over [prompt columns: q.k_p * scale ; image columns: q.k * scale + rel. position] of
    [v_p ; v], per head, then proj; the relative position of query (hq, wq) and key (hk, wk) is
    q . (rel_pos_h[hq - hk + H - 1] + rel_pos_w[wq - wk + W - 1]) (SAM, query and key grids equal)."""
    b, h, w, _ = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, h * w, 3, heads, -1).unbind(2)  # (B, HW, heads, c)
    if getattr(attn, "q_pool", None) is not None:  # SAM 2: max over 2 x 2 queries
        q = q.reshape(b, h // 2, 2, w // 2, 2, -1).amax(dim=(2, 4))
        q = q.reshape(b, (h // 2) * (w // 2), heads, -1)
    c = q.shape[-1]
    pk, pv = key.reshape(b, -1, heads, c), value.reshape(b, -1, heads, c)
    scale = c ** -0.5
    image = torch.einsum("bihc,bjhc->bhij", q, k) * scale
    if rel_pos:
        rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
        r = (attn.rel_pos_h[rows[:, None] - rows[None, :] + h - 1]
             + attn.rel_pos_w[cols[:, None] - cols[None, :] + w - 1])  # (HW, HW, c)
        image = image + torch.einsum("bihc,ijc->bhij", q, r)
    weights = torch.cat([torch.einsum("bihc,bphc->bhip", q, pk) * scale, image], dim=-1).softmax(-1)
    out = torch.einsum("bhij,bjhc->bihc", weights, torch.cat([pv, v], dim=1))
    side = int(round(math.sqrt(q.shape[1])))
    return attn.proj(out.reshape(b, side, side, -1))


def test_the_recomputed_attention_with_prompts_is_the_literal_formula(backbone):
    seen = attention_inputs(backbone, a_batch(backbone).images)
    backbone = copy.deepcopy(backbone)  # its relative positions are changed below
    g = torch.Generator().manual_seed(5)
    for i, (x, _) in seen.items():
        attn = backbone.attention(i)
        rel_pos = bool(getattr(attn, "use_rel_pos", False))
        if rel_pos:  # SAM's are zero in a random model: make them count
            with torch.no_grad():
                attn.rel_pos_h.normal_(generator=g)
                attn.rel_pos_w.normal_(generator=g)
        width = attn.qkv.out_features // 3
        key, value = torch.randn(2, x.shape[0], 7, width, generator=g).unbind(0)
        with torch.no_grad():
            got = backbone.prefixed_attention(i)(x, key, value)
            torch.testing.assert_close(got, literal_attention(attn, x, key, value, rel_pos), rtol=1e-4, atol=1e-5)
            assert not torch.allclose(got, attn(x), atol=1e-3), i  # the prompts do act


def test_every_image_and_every_window_gets_its_own_prompts(backbone):
    spec = PromptPoolSpec.for_backbone(backbone)
    torch.manual_seed(4)
    module = spec.build(backbone).eval()
    b = a_batch(backbone)
    prefix = backbone.encode_prefix(b.images)
    with torch.no_grad():
        q = backbone.selector_embedding(prefix)  # keys 0..4 toward image 0's query, 5..9 toward image 1's
        n = F.normalize(q, dim=1)
        d = n[0] - n[1]  # cos(q0, d) > 0 > cos(q1, d)
        module.keys.copy_(torch.cat([d.expand(5, -1), -d.expand(5, -1)]))
        chosen = module.select(q)[0]
        assert chosen.shape == (2, spec.top_k) and set(chosen[0].tolist()) == {0, 1, 2, 3, 4} \
            and set(chosen[1].tolist()) == {5, 6, 7, 8, 9}
        both, _ = module.segment(backbone, prefix, None, None, b.points, b.labels)
        alone = [module.segment(backbone, {k: v[n:n + 1] for k, v in prefix.items()}, None, None,
                                b.points[n:n + 1], b.labels[n:n + 1])[0] for n in range(2)]
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-4, atol=1e-4)
    assert module.last_similarity.shape == (1, spec.top_k)


def test_l2p_adds_the_key_pull_loss_and_only_it_moves_the_keys(data, tmp_path):
    losses = {}
    for w in (0.0, 0.3):
        cfg = cfg_for(data, "sam", tmp_path / "run", "l2p", l2p_pull_weight=w)
        model = pipeline.build_model(cfg, CPU)
        method = L2P(cfg, model, CPU)
        module = method.begin_domain(0, "polyp", trains=True)
        b = a_batch(model.backbone)
        loss = method.observe(b, model.backbone.encode_prefix(b.images), SegmentStep(model.backbone, module))
        losses[w] = (loss, pull_loss(module.last_similarity))
        terms = method.take_terms()
        assert list(terms) == ["task", "l2p_pull"]
        assert terms["l2p_pull"].item() == pytest.approx(w * losses[w][1].item())
        assert (terms["task"] + terms["l2p_pull"]).item() == pytest.approx(loss.item(), rel=1e-6)
        loss.backward()
        assert all(p.grad.any() for p in module.prompts)
        assert module.keys.grad.any() == (w > 0)  # the segmentation loss gives the keys no gradient
    torch.testing.assert_close(losses[0.3][0] - losses[0.0][0], 0.3 * losses[0.3][1])
    assert 0 < losses[0.3][1].item() < 2 * module.spec.top_k


# ---------------------------------------------------------------------------------------------- end to end
def module_file(run, domain):
    return read_tagged(run / f"{domain}.safetensors", "module file")


def check_run(run, cfg, metrics, kind):
    """Two trained domains, a snapshot each; storage keeps the latest; test and load_run agree."""
    assert set(json.loads((run / "run.json").read_text())["modules"]) == {"polyp", "shadow"}
    steps = metrics["steps"]
    assert [s["trained"] for s in steps] == [True, True]
    assert all("selector_counts" not in r for s in steps for r in s["evaluation"].values())
    assert steps[1]["storage"]["kept_bytes"] == (run / "shadow.safetensors").stat().st_size
    assert not (run / "selector").exists() and not (run / "embedding_buffer").exists()
    iou = metrics["accuracy_matrix"]["matrix"]["iou"]
    report = pipeline.test(run, cfg, CPU, with_vanilla=False)
    for j, d in enumerate(("polyp", "shadow")):
        assert report["results"][d]["metrics"]["iou"] == pytest.approx(iou[1][j])
    model = pipeline.load_run(run, cfg, CPU)
    assert model.selector is None and model.domains == ["polyp", "shadow"]
    assert all(type(model.module_for(d)).name == kind for d in model.domains)
    return model


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_olora_trains_a_pair_per_domain_and_keeps_the_old_ones(data, tmp_path, family):
    run = tmp_path / "run"
    cfg = cfg_for(data, family, run, "olora")
    metrics = pipeline.train(cfg, CPU)
    first, second = module_file(run, "polyp"), module_file(run, "shadow")
    assert (first["kind"], first["spec"]["tasks"], second["spec"]["tasks"]) == ("olora", 1, 2)
    old, new = first["state_dict"], second["state_dict"]
    assert set(new) == set(old) | {k.replace("pairs.0.", "pairs.1.") for k in old}
    assert all(torch.equal(new[k], v) for k, v in old.items())  # the first pair went through domain 2 unchanged
    assert all(old[k].any() for k in old if ".B." in k)  # it trained on domain 1 ...
    assert all(new[k].any() for k in new if k.startswith("pairs.1.B."))  # ... and the second on domain 2
    model = check_run(run, cfg, metrics, "olora")
    assert model.module_for("shadow").spec.tasks == 2
    if family == "sam":  # resume with a third domain: the pairs so far come from the file, frozen
        pipeline.resume(run, {"order": "polyp_shadow_lesion"}, CPU)
        third = module_file(run, "lesion")
        assert third["spec"]["tasks"] == 3 and all(torch.equal(third["state_dict"][k], v) for k, v in new.items())


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_l2p_trains_one_pool_through_the_domains(data, tmp_path, family):
    run = tmp_path / "run"
    cfg = cfg_for(data, family, run, "l2p")
    metrics = pipeline.train(cfg, CPU)
    first, second = module_file(run, "polyp"), module_file(run, "shadow")
    assert first["kind"] == "prompt_pool" and first["spec"] == second["spec"]
    assert (first["spec"]["pool_size"], first["spec"]["top_k"], first["spec"]["length"]) == (10, 5, 5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        fresh = pipeline.build_model(cfg, CPU).new_module().state_dict()
    for k in fresh:  # the keys (pull loss) and the prompts (both losses) trained in both domains
        assert not torch.equal(first["state_dict"][k], fresh[k]) and not torch.equal(second["state_dict"][k],
                                                                                     first["state_dict"][k]), k
    check_run(run, cfg, metrics, "prompt_pool")


def test_l2p_trains_under_torchrun(data, tmp_path):
    """The keys get their gradient from the pull term, outside the forward's outputs: DDP must not
    take them for unused parameters (it would stop at the first backward)."""
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "train.py", "--config", "configs/demo_sam.yaml",
           "--cuda", "-1", "--device", "cpu", "--data_root", str(data), "--run_dir", str(run), "--epoch", "1",
           "--batch_size", "2", "--order", "polyp", "--unseen", "--num_workers", "0", "--method", "l2p",
           "--learning_module", "prompt_pool"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert module_file(run, "polyp")["kind"] == "prompt_pool"
