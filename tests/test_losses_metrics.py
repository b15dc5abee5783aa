"""Loss and metric values against hand-computed small cases."""
import json
import math

import pytest
import torch

from samcl.losses import dice_loss, focal_loss, iou_target, samcl_loss
from samcl.metrics import METRICS, AccuracyMatrix, MetricAccumulator, per_image_metrics


def img(rows):
    return torch.tensor(rows, dtype=torch.float32).view(1, 1, len(rows), len(rows[0]))


def test_focal_and_dice_hand_computed():
    # p = 0.5 everywhere: BCE = ln 2, focal = 0.8 * 0.5^2 * ln 2
    logits, target = img([[0.0, 0.0], [0.0, 0.0]]), img([[1, 0], [0, 0]])
    assert focal_loss(logits, target).item() == pytest.approx(0.2 * math.log(2))
    # dice = 1 - (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5
    assert dice_loss(logits, target).item() == pytest.approx(0.5)
    # p = sigmoid(2) everywhere, all foreground
    p = 1 / (1 + math.exp(-2))
    logits2, target2 = img([[2.0, 2.0], [2.0, 2.0]]), img([[1, 1], [1, 1]])
    bce = -math.log(p)
    assert focal_loss(logits2, target2).item() == pytest.approx(0.8 * (1 - math.exp(-bce)) ** 2 * bce, rel=1e-5)
    assert dice_loss(logits2, target2).item() == pytest.approx(1 - (2 * 4 * p + 1) / (4 * p + 4 + 1), rel=1e-6)


def test_iou_target_reference_thresholds_raw_logits_at_half():
    logits, target = img([[0.2, 0.7], [-1.0, 3.0]]), img([[1, 1], [0, 0]])
    # reference: logits >= 0.5 -> {0.7, 3.0}: inter 1, union 3
    assert iou_target(logits, target, "reference").item() == pytest.approx(1 / 3)
    # sigmoid >= 0.5 <=> logits >= 0 -> {0.2, 0.7, 3.0}: inter 2, union 3
    assert iou_target(logits, target, "sigmoid").item() == pytest.approx(2 / 3)
    # both empty: the release's 0 / (0 + 1e-7) = 0 (the metrics count such an image as IoU 1)
    assert iou_target(img([[-1.0]]), img([[0]]), "reference").item() == 0.0


def test_batch_loss_sums_per_image_terms_and_averages_the_iou_mse():
    logits = torch.cat([img([[0.0, 0.0], [0.0, 0.0]]), img([[2.0, 2.0], [2.0, 2.0]])])
    target = torch.cat([img([[1, 0], [0, 0]]), img([[1, 1], [1, 1]])])
    iou_pred = torch.tensor([[0.3], [0.9]])
    p = 1 / (1 + math.exp(-2))
    bce = -math.log(p)
    img1 = 0.2 * math.log(2) + 10 * 0.5
    img2 = 0.8 * (1 - math.exp(-bce)) ** 2 * bce + 10 * (1 - (8 * p + 1) / (4 * p + 5))
    # IoU targets: image 1 predicts nothing (0 >= 0.5 is false) -> 0; image 2 predicts all -> 1
    mse = ((0.3 - 0.0) ** 2 + (0.9 - 1.0) ** 2) / 2
    assert samcl_loss(logits, iou_pred, target).item() == pytest.approx(img1 + img2 + mse, rel=1e-6)


def test_loss_gradient_reaches_logits_but_not_the_iou_target():
    logits = torch.zeros(1, 1, 2, 2, requires_grad=True)
    iou_pred = torch.tensor([[0.5]], requires_grad=True)
    samcl_loss(logits, iou_pred, img([[1, 0], [0, 1]])).backward()
    assert logits.grad.abs().sum() > 0 and iou_pred.grad.item() == pytest.approx(2 * (0.5 - 0.0))


def test_per_image_metrics_hand_computed():
    logits = torch.cat([img([[1.0, -1.0], [1.0, 0.0]]), img([[-1.0, -2.0], [-3.0, -4.0]])])
    target = torch.cat([img([[1, 0], [0, 1]]), img([[0, 0], [0, 0]])])
    m = per_image_metrics(logits, target)
    # image 1: P = [[1,0],[1,1]] (sigmoid(0) = 0.5 counts), G = [[1,0],[0,1]]: inter 2, |P| 3, |G| 2
    assert m["iou"][0].item() == pytest.approx(2 / 3)
    assert m["f1"][0].item() == pytest.approx(4 / 5)
    assert m["mae"][0].item() == pytest.approx(1 / 4)
    # image 2: both empty -> IoU = F1 = 1, MAE = 0
    assert m["iou"][1].item() == 1.0 and m["f1"][1].item() == 1.0 and m["mae"][1].item() == 0.0
    acc = MetricAccumulator()
    acc.update(m)
    r = acc.result()
    assert r["n"] == 2 and r["iou"] == pytest.approx((2 / 3 + 1) / 2)


def test_aa_fm_ft_on_a_hand_made_matrix():
    a = AccuracyMatrix(["A", "B", "C", "U"], unseen=["U"])
    rows = {0: [0.8, 0.3], 1: [0.7, 0.9, 0.2], 2: [0.6, 0.85, 0.75, 0.4], 3: [0.6, 0.85, 0.75, 0.45]}
    for t, row in rows.items():
        for j, v in enumerate(row):
            a.set(t, j, {"iou": v, "f1": v, "mae": 1 - v, "n": 10})
    s0, s1, s2, s3 = (a.summary(t) for t in range(4))
    assert a.release_summary(0) == {"AA": pytest.approx(0.8), "FM": pytest.approx(0.0), "FT": None}
    assert s1["AA"] == pytest.approx(0.8) and s1["FM"] == pytest.approx(0.05) and s1["FT"] == pytest.approx(0.3)
    assert s2["AA"] == pytest.approx(2.2 / 3) and s2["FM"] == pytest.approx(0.25 / 3) and s2["FT"] == pytest.approx(0.25)
    # the unseen step: L = t - 1, so U itself does not enter AA/FM
    assert s3["AA"] == pytest.approx(2.2 / 3) and s3["FM"] == pytest.approx(0.25 / 3) and s3["FT"] == pytest.approx(0.25)
    d = a.to_dict()
    assert d["matrix"]["iou"][1] == [0.7, 0.9, 0.2, None]
    assert d["summary"]["iou"][2]["step"] == 2


def non_monotone_matrix() -> AccuracyMatrix:
    """Domains A, B, C and the test-only U. A improves after B (0.5 -> 0.8), then drops (0.4); the
    unseen step (t = 3) moves B as a retrained selector would. MAE is 1 - IoU; Z the vanilla scores."""
    a = AccuracyMatrix(["A", "B", "C", "U"], unseen=["U"])
    rows = {0: [0.5, 0.2], 1: [0.8, 0.6, 0.3], 2: [0.4, 0.5, 0.7, 0.25], 3: [0.4, 0.45, 0.7, 0.3]}
    for t, row in rows.items():
        for j, v in enumerate(row):
            a.set(t, j, {"iou": v, "f1": v, "mae": 1 - v, "n": 10})
    for j, z in enumerate([0.1, 0.15, 0.2, 0.35]):
        a.set_vanilla(j, {"iou": z, "f1": z, "mae": 1 - z, "n": 10})
    return a


def test_canonical_metrics_on_a_hand_computed_non_monotone_matrix():
    a = non_monotone_matrix()
    s0, s2, s3 = a.summary(0), a.summary(2), a.summary(3)
    # after the first domain nothing can be forgotten or transferred yet
    assert {k: s0[k] for k in ("FM_max", "BWT", "FWT", "unseen", "unseen_vanilla")} == dict.fromkeys(
        ("FM_max", "BWT", "FWT", "unseen", "unseen_vanilla"))
    assert s0["AIA"] == pytest.approx(0.5)
    # t = 2. FM_max: A from its best 0.8 (after B) to 0.4, B from 0.6 to 0.5: (0.4 + 0.1) / 2; the
    # release's FM measures A from A[0][0] = 0.5 and averages C's 0 in: (0.1 + 0.1 + 0) / 3
    assert s2["FM_max"] == pytest.approx(0.25) and s2["FM"] == pytest.approx(0.2 / 3)
    assert s2["BWT"] == pytest.approx(((0.4 - 0.5) + (0.5 - 0.6)) / 2)
    assert s2["FWT"] == pytest.approx(((0.2 - 0.15) + (0.3 - 0.2)) / 2)  # A[0][1] - Z[B], A[1][2] - Z[C]
    assert s2["FT"] == pytest.approx((0.2 + 0.3) / 2)  # the release's raw A[j][j+1]
    assert s2["AIA"] == pytest.approx((0.5 + (0.8 + 0.6) / 2 + (0.4 + 0.5 + 0.7) / 3) / 3)
    assert s2["unseen"] == pytest.approx(0.25) and s2["unseen_vanilla"] == pytest.approx(0.35)
    # t = 3, the unseen step: row 3 is the final state; U enters only the unseen columns
    assert s3["FM_max"] == pytest.approx(((0.8 - 0.4) + (0.6 - 0.45)) / 2)
    assert s3["BWT"] == pytest.approx(((0.4 - 0.5) + (0.45 - 0.6)) / 2)
    assert s3["FWT"] == pytest.approx(s2["FWT"])
    assert s3["AIA"] == pytest.approx((0.5 + 0.7 + (0.4 + 0.45 + 0.7) / 3) / 3)
    assert s3["unseen"] == pytest.approx(0.3) and s3["unseen_vanilla"] == pytest.approx(0.35)
    assert s3["AA"] == pytest.approx(1.55 / 3) and s3["FM"] == pytest.approx(0.25 / 3)


def test_mae_forgetting_and_transfer_read_as_for_iou_but_the_release_fm_keeps_its_sign():
    a = non_monotone_matrix()
    for t in range(4):
        iou, mae = a.summary(t, "iou"), a.summary(t, "mae")
        for k in ("FM_max", "BWT", "FWT"):  # MAE = 1 - IoU: a rise of MAE is the same forgetting
            assert mae[k] == (None if iou[k] is None else pytest.approx(iou[k])), (t, k)
        assert mae["AIA"] == pytest.approx(1 - iou["AIA"]) and mae["AA"] == pytest.approx(1 - iou["AA"])
    # A's MAE went 0.5, 0.2, 0.6: its FM_max term is +0.4 (from its best, 0.2), the release's FM term
    # A[0][0] - A[2][0] = -0.1 (the release's formula, kept as it is for every metric)
    assert a.summary(2, "mae")["FM_max"] == pytest.approx((0.4 + 0.1) / 2)
    assert a.summary(2, "mae")["FM"] == pytest.approx(-0.2 / 3)


def test_the_summary_is_recomputed_from_the_written_matrix():
    a = non_monotone_matrix()
    d = json.loads(json.dumps(a.to_dict()))
    assert d["vanilla"]["iou"] == [0.1, 0.15, 0.2, 0.35]
    b = AccuracyMatrix.from_dict(d)
    assert [b.summary(t, m) for t in range(4) for m in METRICS] == [a.summary(t, m) for t in range(4) for m in METRICS]
    # a matrix written before the vanilla scores were recorded: no FWT and no vanilla beside unseen
    old = {k: v for k, v in d.items() if k != "vanilla"}
    s = AccuracyMatrix.from_dict(old).summary(3)
    assert s["FWT"] is None and s["unseen_vanilla"] is None and s["FM_max"] == pytest.approx(0.275)


def test_the_report_draws_mae_forgetting_positive_for_a_rise():
    from samcl.pictures import forgetting_curve

    summary = non_monotone_matrix().to_dict()["summary"]
    mae, iou = forgetting_curve(summary["mae"], "mae"), forgetting_curve(summary["iou"], "iou")
    assert mae == pytest.approx(iou) and mae[2] == pytest.approx(0.2 / 3)  # A rise of MAE draws positive


def test_the_test_table_prints_the_canonical_columns_after_the_release_ones():
    from samcl.pipeline import format_table

    summary = {m: non_monotone_matrix().summary(3, m) for m in METRICS}
    lines = format_table({"domains": [], "results": {}}, summary).splitlines()
    assert lines[-6].startswith("continual (iou): AA 0.5167  FM 0.0833  FT 0.2500")
    assert lines[-3] == ("canonical (iou): FM_max 0.2750  BWT -0.1250  FWT 0.0750  AIA 0.5722  unseen 0.3000 "
                         "(vanilla 0.3500)")
    assert lines[-1].startswith("canonical (mae): FM_max 0.2750  BWT -0.1250")
    old = {m: {k: summary[m][k] for k in ("AA", "FM", "FT")} for m in METRICS}  # a run written before
    assert "canonical" not in format_table({"domains": [], "results": {}}, old)
