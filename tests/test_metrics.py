"""Metrics (training.evaluate) against hand-computed cases and scipy-derived references."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from training.eval_report import cross_dataset_table, markdown_report, plot_roc, results_json
from training.evaluate import (
    accuracy,
    action_rates,
    average_precision,
    binary_metrics,
    eer,
    evaluate_scores,
    roc_auc,
    roc_curve,
    threshold_for_fpr,
    video_level,
)


def pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    """P(fake > real) + 0.5 P(tie), by brute force over all pairs."""
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def mannwhitney_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    return float(stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic / (len(pos) * len(neg)))


# -- hand-computed cases ---------------------------------------------------------------------------


def test_hand_computed_case():
    # The classic four-sample case: pairs (fake, real) = (.35,.1) ok, (.35,.4) wrong, (.8,.1) ok, (.8,.4) ok.
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert roc_auc(y, s) == pytest.approx(0.75)
    # AP: thresholds .8 (P=1, R=.5), .4 (P=.5, R=.5), .35 (P=2/3, R=1) -> .5*1 + 0 + .5*2/3
    assert average_precision(y, s) == pytest.approx(0.5 + 1 / 3)
    fpr, tpr, thr = roc_curve(y, s)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert thr[0] == np.inf and list(thr[1:]) == [0.8, 0.4, 0.35, 0.1]
    assert eer(y, s) == pytest.approx(0.5)  # at t in (.35, .4]: one real over, one fake under
    assert accuracy(y, s, 0.5) == pytest.approx(0.75)  # .35 fake missed
    assert accuracy(y, s, 0.35) == pytest.approx(0.75)  # >= threshold is fake: .4 real called fake


def test_perfect_inverted_and_constant():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert roc_auc(y, s) == 1.0 and eer(y, s) == 0.0 and average_precision(y, s) == 1.0
    assert roc_auc(y, 1 - s) == 0.0 and eer(y, 1 - s) == 1.0
    const = np.full(5, 0.5)
    assert roc_auc(y, const) == 0.5  # every pair is a tie
    assert eer(y, const) == pytest.approx(0.5)
    assert average_precision(y, const) == pytest.approx(2 / 5)  # one threshold: precision = prevalence


def test_ties_count_half():
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.3, 0.3, 0.5, 0.5, 0.9, 0.1])
    # fake .3 vs reals (.3 tie, .5 lose, .1 win) = 1.5; .5 vs (win, tie, win) = 2.5; .9 wins 3 -> 7/9
    assert roc_auc(y, s) == pytest.approx(7 / 9)
    assert roc_auc(y, s) == pytest.approx(pairwise_auc(y, s))


def test_eer_interpolates_between_roc_points():
    # fpr/fnr cross between two thresholds; the linear ROC segment gives the crossing exactly.
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    # t=.6: fpr .25, fnr .25 (fake .4 missed) -> EER 0.25 exactly at a point
    assert eer(y, s) == pytest.approx(0.25)


# -- against scipy / brute force on random data ------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_mann_whitney_and_pairs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = np.round(rng.random(n) + 0.3 * y, 1 if seed % 2 else 6)  # coarse rounding -> many ties
    assert roc_auc(y, s) == pytest.approx(mannwhitney_auc(y, s), abs=1e-12)
    assert roc_auc(y, s) == pytest.approx(pairwise_auc(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_auc_is_area_under_roc_curve(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)
    fpr, tpr, _ = roc_curve(y, s)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and fpr[-1] == 1 and tpr[-1] == 1
    assert roc_auc(y, s) == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_average_precision_matches_definition(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    s = np.round(rng.random(150) + 0.4 * y, 2)
    # Reference: sum over distinct thresholds t (descending) of (R(t) - R(prev)) * P(t), by brute force.
    ap, prev_r = 0.0, 0.0
    for t in np.unique(s)[::-1]:
        pred = s >= t
        r = (pred & (y == 1)).sum() / (y == 1).sum()
        p = (pred & (y == 1)).sum() / pred.sum()
        ap += (r - prev_r) * p
        prev_r = r
    assert average_precision(y, s) == pytest.approx(ap, abs=1e-12)


def test_eer_point_has_equal_error_rates():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 2000)
    s = rng.normal(size=2000) + 1.5 * y
    e = eer(y, s)
    # Over the empirical thresholds, the one where FPR and FNR are closest brackets the EER.
    best = min(((np.mean(s[y == 0] >= t), np.mean(s[y == 1] < t)) for t in np.unique(s)),
               key=lambda fr: abs(fr[0] - fr[1]))
    assert min(best) - 1e-3 <= e <= max(best) + 1e-3
    # Normal(0,1) vs Normal(1.5,1): EER = Phi(-0.75) ~ 0.227
    assert e == pytest.approx(stats.norm.cdf(-0.75), abs=0.03)


# -- degenerate input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [roc_auc, eer, average_precision, roc_curve])
def test_single_class_raises(fn):
    with pytest.raises(ValueError, match="both real and fake"):
        fn([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="both real and fake"):
        fn([0, 0], [0.2, 0.5])


def test_binary_metrics_reports_nan_on_one_class():
    m = binary_metrics([0, 0, 0], [0.1, 0.7, 0.2], threshold=0.5)
    assert math.isnan(m["auc"]) and math.isnan(m["eer"]) and math.isnan(m["ap"]) and math.isnan(m["tpr"])
    assert m["acc"] == pytest.approx(2 / 3) and m["fpr"] == pytest.approx(1 / 3)
    assert results_json({"x": m})["x"]["auc"] is None  # nan -> null in JSON


def test_input_validation():
    with pytest.raises(ValueError, match="length"):
        roc_auc([0, 1], [0.5])
    with pytest.raises(ValueError, match="0 \\(real\\) or 1"):
        roc_auc([0, 2], [0.5, 0.6])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0, 1], [0.5, float("nan")])


# -- video level and thresholds ------------------------------------------------------------------------


def test_video_level_is_mean_of_frames():
    scores = [0.2, 0.4, 0.9, 0.7, 0.1, 0.6]
    labels = [0, 0, 1, 1, 0, 1]
    vids = ["a", "a", "b", "b", "c", "d"]
    vs, vl, ids = video_level(scores, labels, vids)
    assert ids == ["a", "b", "c", "d"]
    np.testing.assert_allclose(vs, [0.3, 0.8, 0.1, 0.6])
    assert list(vl) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="both labels"):
        video_level([0.1, 0.2], [0, 1], ["a", "a"])


def test_video_level_can_beat_frame_level():
    # Noisy frames, but each video's mean is on the right side.
    scores = [0.6, 0.1, 0.2, 0.4, 0.9, 0.8]
    labels = [0, 0, 0, 1, 1, 1]
    vids = ["r", "r", "r", "f", "f", "f"]
    res = evaluate_scores(scores, labels, vids)
    assert res["frame"]["auc"] < 1.0 and res["video"]["auc"] == 1.0
    assert res["n_crops"] == 6 and res["n_videos"] == 2
    assert res["video"]["n_real"] == 1 and res["video"]["n_fake"] == 1


@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_threshold_for_fpr_meets_target(target, seed):
    rng = np.random.default_rng(seed)
    real = np.round(rng.beta(2, 5, 101), 2)  # ties included
    t = threshold_for_fpr(real, target)
    fpr = np.mean(real >= t)
    assert fpr <= target + 1e-12
    # ... and it is the lowest such threshold among the scores: one step lower breaks the target
    lower = real[real < t]
    if lower.size and target < 1.0:
        assert np.mean(real >= lower.max()) > target


def test_threshold_for_fpr_edges():
    assert threshold_for_fpr([0.2, 0.4, 0.6, 0.8], 0.25) == pytest.approx(0.6)  # just above 0.6: 0.8 only
    assert threshold_for_fpr([0.2, 0.4, 0.6, 0.8], 0.25) > 0.6
    assert threshold_for_fpr([0.2, 0.4], 1.0) == 0.0
    assert threshold_for_fpr([1.0, 0.5], 0.0) == 1.0  # capped: a real score of 1.0 stays a false positive
    with pytest.raises(ValueError):
        threshold_for_fpr([], 0.1)
    with pytest.raises(ValueError):
        threshold_for_fpr([0.5], 1.5)


def test_action_rates_hand_computed():
    # reals 0.1 0.35 0.45 0.7 -> allow, review, review, block; fakes 0.2 0.5 0.9 -> allow, review, block
    labels, scores = [0, 0, 0, 0, 1, 1, 1], [0.1, 0.35, 0.45, 0.7, 0.2, 0.5, 0.9]
    rates = action_rates(labels, scores, threshold=0.6, review_threshold=0.3)
    assert rates["real"] == {"allow": 0.25, "review": 0.5, "block": 0.25, "n": 4}
    assert rates["fake"] == pytest.approx({"allow": 1 / 3, "review": 1 / 3, "block": 1 / 3, "n": 3})
    assert rates["real"]["block"] == binary_metrics(labels, scores, 0.6)["fpr"]  # block is the labelled fake
    with pytest.raises(ValueError, match="above the threshold"):
        action_rates(labels, scores, threshold=0.3, review_threshold=0.6)
    # video level in evaluate_scores (mean of frames): v0 (0.1, 0.5) -> 0.3 review; v1 (0.9, 0.9) -> block
    res = evaluate_scores([0.1, 0.5, 0.9, 0.9], [0, 0, 1, 1], ["v0", "v0", "v1", "v1"], threshold=0.6,
                          review_threshold=0.3)
    assert res["video_actions"]["real"]["review"] == 1.0 and res["video_actions"]["fake"]["block"] == 1.0
    assert "| real | 0.00 | 100.00 | 0.00 | 1 |" in markdown_report(res)
    assert "video_actions" not in evaluate_scores([0.1, 0.9], [0, 1], ["a", "b"])


# -- reports -----------------------------------------------------------------------------------------


def test_group_tables_and_markdown(tmp_path):
    rng = np.random.default_rng(0)
    meta, scores, labels, vids = [], [], [], []
    for comp in ("c23", "c40"):
        for manip in ("", "Deepfakes", "FaceSwap"):
            for v in range(4):
                for f in range(3):
                    y = int(manip != "")
                    meta.append({"source": "ffpp", "manipulation": manip, "compression": comp})
                    scores.append(float(np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2), 0, 1)))
                    labels.append(y)
                    vids.append(f"{comp}_{manip or 'real'}_{v}")
    res = evaluate_scores(scores, labels, vids, meta=meta)
    groups = {(g["manipulation"], g["compression"]): g for g in res["groups"]}
    assert set(groups) == {("Deepfakes", "c23"), ("FaceSwap", "c23"), ("Deepfakes", "c40"), ("FaceSwap", "c40")}
    # Each manipulation is judged against the reals of its own compression: 4 real + 4 fake videos.
    assert groups[("Deepfakes", "c23")]["video"]["n_real"] == 4 and groups[("Deepfakes", "c23")]["video"]["n_fake"] == 4
    assert [g["compression"] for g in res["by_compression"]] == ["c23", "c40"]
    md = markdown_report(res, name="m")
    assert "Table I" in md and "Table II" in md and "Table III" in md and "| m |" in md
    # Table III's FF++ column: the reals against the Deepfakes fakes alone ("only on the deepfake class")
    (ffpp,) = res["by_source"]
    dfc = ffpp["deepfakes_class"]
    assert (dfc["video"]["n_real"], dfc["video"]["n_fake"]) == (8, 8) and ffpp["video"]["n_fake"] == 16
    only = [i for i, m in enumerate(meta) if m["manipulation"] in ("", "Deepfakes")]
    assert dfc["frame"]["auc"] == pytest.approx(roc_auc([labels[i] for i in only], [scores[i] for i in only]))
    assert "| ffpp (Deepfakes) |" in md and f"| {dfc['frame']['auc']:.4f} |" in md
    celeb = evaluate_scores([0.2, 0.7], [0, 1], ["r", "f"], meta=[{"source": "celebdf"}] * 2)
    table = cross_dataset_table({"ffpp_c23": res, "celebdf": celeb}, name="m")
    assert "| method | ffpp_c23 (Deepfakes) | celebdf |" in table
    assert f"| m | {dfc['frame']['auc']:.4f} | 1.0000 |" in table
    one = evaluate_scores(scores[:24], labels[:24], vids[:24], meta=meta[:24])  # c23 reals and Deepfakes only
    assert "deepfakes_class" not in one["by_source"][0] and "(Deepfakes)" not in cross_dataset_table({"a": one})
    png = plot_roc({"frame": (labels, scores)}, tmp_path / "roc.png")
    assert png.stat().st_size > 1000
