"""The model package: Xception layout and weights, frequency layers, cross-stitch flow, variants.
(ONNX export: test_export.py.)

Fast on 2 CPU cores: everything that runs a forward pass uses the tiny variants (or a 64×64 input);
the full-width trunk is only built, for its parameter count and key layout.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from calibrated import astronaut_crops
from torch import nn

from training.models import (
    CLASSIC_PARAMS_WITH_FC,
    CLASSIC_TRUNK_PARAMS,
    STITCH_POINTS,
    CrossStitch,
    LogDCT,
    LogDWT,
    LogFFT,
    MDCSDNetwork,
    Xception,
    create_model,
    list_models,
    load_imagenet_weights,
    param_groups,
    spectrum_stats,
    stitch_parameters,
)
from worker.preprocess import SPECTRUM_EPS, log_dct_spectrum


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def real_crops() -> np.ndarray:
    return astronaut_crops()


# -- Xception ---------------------------------------------------------------------------------------

def test_classic_trunk_parameter_count_and_keys() -> None:
    trunk = Xception(num_classes=0)
    assert n_params(trunk) == CLASSIC_TRUNK_PARAMS == 20_806_952
    assert n_params(Xception(num_classes=1000)) == CLASSIC_PARAMS_WITH_FC == 22_855_952
    keys = set(trunk.state_dict())
    for k in [
        "conv1.weight", "bn1.running_mean", "conv2.weight", "bn2.weight",
        "block1.skip.weight", "block1.skipbn.weight", "block1.rep.0.conv1.weight", "block1.rep.0.pointwise.weight",
        "block1.rep.1.running_var", "block2.rep.1.conv1.weight", "block4.rep.1.pointwise.weight",
        "block11.rep.7.pointwise.weight", "block12.skip.weight", "block12.rep.1.pointwise.weight",
        "conv3.conv1.weight", "conv3.pointwise.weight", "bn3.weight", "conv4.pointwise.weight", "bn4.running_var",
    ]:
        assert k in keys, k
    assert not any(k.startswith("fc.") for k in keys)
    assert "block4.skip.weight" not in keys  # middle-flow blocks have identity skips
    assert trunk.block12.rep[4].pointwise.weight.shape == (1024, 728, 1, 1)  # grow_first=False
    assert tuple(trunk.stage_channels) == (128, 256, 728, 1024, 2048)


def test_cadene_state_dict_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = Xception(num_classes=1000)
    with torch.no_grad():
        for b in src.buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)  # running stats differ from a fresh trunk's
    # Cadene/FF++ format: 2-D pointwise weights, fc present, no num_batches_tracked (PyTorch 0.3 era).
    sd = {}
    for k, v in src.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        sd[k] = v.squeeze(-1).squeeze(-1).clone() if "pointwise" in k else v.clone()
    assert sd["block1.rep.0.pointwise.weight"].dim() == 2
    path = tmp_path / "xception-cadene.pth"
    torch.save(sd, path)

    trunk = load_imagenet_weights(Xception(num_classes=0), path)
    ref = src.state_dict()
    got = trunk.state_dict()
    for k, v in got.items():
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(v, ref[k]), k
    # With an fc, and from a DataParallel-wrapped file, the fc comes too.
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    with_fc = load_imagenet_weights(Xception(num_classes=1000), path)
    assert torch.equal(with_fc.fc.weight, src.fc.weight)
    assert torch.equal(with_fc.block3.rep[4].pointwise.weight, src.block3.rep[4].pointwise.weight)


def test_reduced_width_trunk_stage_shapes() -> None:
    trunk = Xception(0, width=0.125, middle_blocks=2).eval()
    x = torch.rand(1, 3, 299, 299)
    sizes = [74, 37, 19, 10, 10]
    with torch.no_grad():
        for i, (c, s) in enumerate(zip(trunk.stage_channels, sizes)):
            x = trunk.forward_stage(x, i)
            assert x.shape == (1, c, s, s)
    assert trunk.exit_block_name == "block6"


# -- frequency layers -------------------------------------------------------------------------------

def test_log_dct_matches_numpy_and_scipy(real_crops: np.ndarray) -> None:
    import scipy.fft as scipy_fft  # in the test extra: missing is a failure, not a skip
    coeffs = scipy_fft.dctn(real_crops.astype(np.float64), axes=(-2, -1), norm="ortho")
    refs = (log_dct_spectrum(real_crops), np.log(np.abs(coeffs) + SPECTRUM_EPS))
    x = torch.from_numpy(real_crops)

    layer = LogDCT(299, precision="float64")  # equal to the references up to float32 rounding, every bin
    assert n_params(layer) == 0 and not layer.state_dict()  # fixed, and not stored in checkpoints
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    for r in refs:
        assert np.abs(y.numpy() - r).max() < 1e-5

    # float32 products (the default, what TensorRT runs): coefficients agree to float32 rounding
    # (DC ~ 150), and eps = 1e-3 keeps the log from magnifying it in near-zero bins.
    y32 = LogDCT(299)(x).numpy()
    for r in refs:
        assert np.abs(y32 - r).max() < 1e-2
        assert np.median(np.abs(y32 - r)) < 1e-5


def test_frequency_matrices_keep_their_precision(real_crops: np.ndarray) -> None:
    """.float()/.half() on the model must not round the DCT matrix; autocast must not reach it."""
    model = create_model("mdcsd_tiny")
    ref = model.freq_transform(torch.from_numpy(real_crops))
    model.float()
    model.half()
    assert model.freq_transform.dct.dtype == torch.float32
    model.float()
    x = torch.from_numpy(real_crops)
    assert torch.equal(model.freq_transform(x), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.freq_transform(x), ref)


def test_log_fft_and_dwt_match_numpy(real_crops: np.ndarray) -> None:
    x = real_crops.astype(np.float64)
    y = LogFFT(299)(torch.from_numpy(real_crops)).numpy()
    ref = np.log(np.abs(np.fft.fft2(x, norm="ortho")) + SPECTRUM_EPS)
    assert np.abs(np.exp(y) - np.exp(ref)).max() < 2e-4
    assert np.abs(y - ref)[np.exp(ref) > 1e-2].max() < 1e-3

    # Haar on an even size against the textbook 2×2-block formulas, tiled [[LL, LH], [HL, HH]].
    xe = x[..., :298, :298]
    a, b, c, d = xe[..., 0::2, 0::2], xe[..., 0::2, 1::2], xe[..., 1::2, 0::2], xe[..., 1::2, 1::2]
    ll, lh, hl, hh = (a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2
    tiled = np.block([[ll, lh], [hl, hh]])
    yd = LogDWT(298)(torch.from_numpy(xe.astype(np.float32))).numpy()
    refd = np.log(np.abs(tiled) + SPECTRUM_EPS)
    assert np.abs(np.exp(yd) - np.exp(refd)).max() < 1e-5
    # Odd sizes stay orthogonal (energy preserved).
    w = LogDWT(299).haar.double()
    assert torch.allclose(w @ w.T, torch.eye(299, dtype=torch.float64), atol=1e-12)
    assert LogDWT(299)(torch.from_numpy(real_crops)).shape == real_crops.shape


# -- cross-stitch -----------------------------------------------------------------------------------

def test_cross_stitch_init_and_mixing() -> None:
    unit = CrossStitch()
    assert torch.allclose(unit.alpha, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    xr, xd = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    yr, yd = unit(xr, xd)
    assert torch.allclose(yr, 0.9 * xr + 0.1 * xd) and torch.allclose(yd, 0.1 * xr + 0.9 * xd)
    model = create_model("mdcsd_tiny")
    names = [n for n, _ in model.named_parameters() if "cross_stitch" in n]
    assert names == [f"cross_stitch.{p}.alpha" for p in STITCH_POINTS]
    for p in stitch_parameters(model):
        assert torch.allclose(p, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    groups = param_groups(model, lr=2e-4, stitch_lr=1e-3)
    assert [g["lr"] for g in groups] == [2e-4, 1e-3] and len(groups[1]["params"]) == 4
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def post_stitch_change(model: MDCSDNetwork, point: int, perturb: str = "freq") -> tuple[float, float, float]:
    """Perturb one branch's activations right before stitch point `point`; report how much the OTHER
    branch's activations change before and after the stitch, and the expected post-stitch change.

    Returns (max |Δ other branch pre-stitch|, max |Δ other branch post-stitch - α_cross·δ|, max |Δ post|).
    """
    other = "rgb" if perturb == "freq" else "freq"
    src = getattr(model, f"{perturb}_backbone")
    dst = getattr(model, f"{other}_backbone")
    last_src = getattr(src, src.stage_modules[point][-1])  # its output is the pre-stitch map
    last_dst = getattr(dst, dst.stage_modules[point][-1])
    first_next = getattr(dst, dst.stage_modules[point + 1][0])  # its input is the post-stitch map
    delta: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}

    def add_delta(_m, _inp, out):
        if "d" in delta:
            return out + delta["d"]
        return out

    hooks = [
        last_src.register_forward_hook(add_delta),
        last_dst.register_forward_hook(lambda _m, _i, out: seen.__setitem__("pre", out.clone())),
        first_next.register_forward_pre_hook(lambda _m, args: seen.__setitem__("post", args[0].clone())),
    ]
    try:
        x = torch.rand(2, 3, model.input_size, model.input_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            model(x)
            pre0, post0 = seen["pre"], seen["post"]
            c, s = src.stage_channels[point], post0.shape[-1]
            delta["d"] = torch.randn(2, c, s, s, generator=torch.Generator().manual_seed(2))
            model(x)
            pre1, post1 = seen["pre"], seen["post"]
    finally:
        for h in hooks:
            h.remove()
    name = STITCH_POINTS[point]
    if name in model.cross_stitch:
        a = model.cross_stitch[name].alpha.detach()
        cross = a[0, 1] if other == "rgb" else a[1, 0]
    else:
        cross = torch.tensor(0.0)
    expected = cross * delta["d"]
    return (
        float((pre1 - pre0).abs().max()),
        float((post1 - post0 - expected).abs().max()),
        float((post1 - post0).abs().max()),
    )


@pytest.mark.parametrize("point", range(4))
def test_cross_terms_really_flow(point: int) -> None:
    """The freq branch's pre-stitch activations reach the RGB branch (and vice versa) by α_cross·δ.

    A stitch that mixes each branch only with itself (the bug that drops the cross terms) leaves the
    other branch unchanged and fails here.
    """
    torch.manual_seed(0)
    model = create_model("mdcsd_tiny").eval()
    for perturb in ("freq", "rgb"):
        pre, residual, post = post_stitch_change(model, point, perturb)
        assert pre == 0.0  # the other branch's own pre-stitch activations are untouched
        assert post > 0.05  # ... yet after the stitch it has changed
        assert residual < 1e-5  # by exactly α_cross · δ


def test_no_stitch_and_buggy_stitch_do_not_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = create_model("mdcsd_tiny_no_stitch").eval()
    for point in range(4):
        pre, _, post = post_stitch_change(model, point, "freq")
        assert pre == 0.0 and post == 0.0
    one = create_model("mdcsd_tiny_one_stitch").eval()
    assert post_stitch_change(one, 0, "freq")[2] > 0.05
    assert post_stitch_change(one, 1, "freq")[2] == 0.0

    # The check above catches a unit that drops its cross terms.
    def self_only(self, x_r, x_d):
        a = self.alpha
        return a[0, 0] * x_r + a[0, 1] * x_r, a[1, 0] * x_d + a[1, 1] * x_d

    monkeypatch.setattr(CrossStitch, "forward", self_only)
    assert post_stitch_change(create_model("mdcsd_tiny").eval(), 0, "freq")[2] == 0.0


def test_gradients_reach_every_alpha() -> None:
    torch.manual_seed(0)
    model = create_model("mdcsd_tiny").train()
    x = torch.rand(2, 3, 299, 299)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    alphas = stitch_parameters(model)
    assert len(alphas) == 4
    for a in alphas:
        assert a.grad is not None and a.grad.shape == (2, 2)
        assert torch.all(a.grad != 0), a.grad


# -- variants -----------------------------------------------------------------------------------------

EXPECTED_STITCHES = {
    "": 4, "_rgb_only": 0, "_dct_only": 0, "_no_stitch": 0, "_one_stitch": 1, "_fft": 4, "_dwt": 4,
}


def test_registry_lists_the_ablations() -> None:
    names = set(list_models())
    for suffix in EXPECTED_STITCHES:
        assert f"mdcsd{suffix}" in names and f"mdcsd_tiny{suffix}" in names
    with pytest.raises(ValueError, match="unknown model"):
        create_model("nope")


@pytest.mark.parametrize("name", list_models("mdcsd*"))
def test_every_variant_builds_and_classifies(name: str) -> None:
    tiny = "tiny" in name
    # Full-width variants run on 64×64 input (built for it) so the check stays fast.
    model = create_model(name, **({} if tiny else {"input_size": 64})).eval()
    size = model.input_size
    with torch.no_grad():
        logits = model(torch.rand(2, 3, size, size))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    suffix = name.replace("mdcsd_tiny", "").replace("mdcsd", "")
    assert len(stitch_parameters(model)) == EXPECTED_STITCHES[suffix]
    keys = list(model.state_dict())
    if suffix == "_rgb_only":
        assert not any("freq" in k for k in keys) and not hasattr(model, "freq_transform")
    if suffix == "_dct_only":
        assert not any(k.startswith("rgb") for k in keys) and not hasattr(model, "rgb_backbone")
    if suffix in ("_fft", "_dwt"):
        assert model.freq_transform.name == suffix[1:]
    cfg = model.model_config
    assert cfg["architecture"] == name
    if not tiny:
        assert cfg["kwargs"]["width"] == 1.0 and cfg["kwargs"]["middle_blocks"] == 8


def test_full_model_size() -> None:
    model = create_model("mdcsd")
    trunks = n_params(model.rgb_backbone) + n_params(model.freq_backbone)
    assert trunks == 2 * CLASSIC_TRUNK_PARAMS
    # + two 2048->512 branch FCs, the 1024->2 classifier and 4×4 alphas.
    assert n_params(model) == trunks + 2 * (2048 * 512 + 512) + (1024 * 2 + 2) + 16


def test_overrides_and_rebuild_from_config() -> None:
    model = create_model("mdcsd_tiny", stitches=(0, "exit"), transform="fft", drop_rate=0.2)
    assert model.stitch_indices == (0, 3) and model.freq_transform.name == "fft"
    cfg = model.model_config
    clone = create_model(cfg["architecture"], **cfg["kwargs"])
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    x = torch.rand(2, 3, 299, 299)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))
    assert create_model("mdcsd_tiny", branches=("rgb",)).stitch_indices == ()
    with pytest.raises(ValueError):
        create_model("mdcsd_tiny_rgb_only", stitches=(0,))
    assert model.default_cfg["class_names"] == ["real", "fake"]


def test_spectrum_stats_over_batches_equal_one_pass(real_crops: np.ndarray) -> None:
    x = torch.from_numpy(real_crops)
    y = LogDCT(299)(x).double()
    mean, std = spectrum_stats(x)
    assert mean == pytest.approx(y.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert std == pytest.approx(y.std(dim=(0, 2, 3)).tolist(), rel=1e-9)
    batched = spectrum_stats(iter([x[:1], x[1:]]))  # a generator, as training feeds it
    assert batched[0] == pytest.approx(mean, abs=1e-9) and batched[1] == pytest.approx(std, rel=1e-9)
    with pytest.raises(ValueError, match="at least two"):
        spectrum_stats(iter([]))


def test_fitted_freq_norm_rides_in_model_config(real_crops: np.ndarray) -> None:
    """Constants set after construction (training fits them) are what a rebuild from model_config gets,
    and they do normalise: the branch input then has mean 0 and std 1 per channel on those crops."""
    model = create_model("mdcsd_tiny").eval()
    x = torch.from_numpy(real_crops)
    mean, std = spectrum_stats(x)
    model.set_freq_norm(mean, std)
    _, xd = model._inputs(x)
    assert xd.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (xd.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4
    cfg = model.model_config
    assert cfg["kwargs"]["freq_mean"] == pytest.approx(mean, rel=1e-6)
    clone = create_model(cfg["architecture"], **cfg["kwargs"])  # no state dict: the config alone
    assert torch.equal(clone.freq_mean, model.freq_mean) and torch.equal(clone.freq_std, model.freq_std)
    with pytest.raises(ValueError, match="positive"):
        model.set_freq_norm(mean, [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="no frequency branch"):
        create_model("mdcsd_tiny_rgb_only").set_freq_norm(mean, std)


def test_rgb_branch_loads_imagenet_file(tmp_path: Path) -> None:
    src = Xception(num_classes=1000)
    path = tmp_path / "xception.pth"
    torch.save({k.replace("fc.", "last_linear."): v for k, v in src.state_dict().items()}, path)
    model = create_model("mdcsd_rgb_only", imagenet_path=path)
    assert torch.equal(model.rgb_backbone.conv4.pointwise.weight, src.conv4.pointwise.weight)
