"""fire_repair.trigger_spectrum: the share of a trigger's displacement in its top directions and
what a clean-calibrated gate reaches, on models where the answer is known."""
import pytest
import torch
from torch import nn

import fire_repair as fr


class Net(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.body = nn.Identity()
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _data(n=200, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_one_direction_is_carried_by_k1_and_reached():
    twins, clean = _data()
    v = torch.zeros(32)
    v[5] = 6.0  # six clean stds along one axis
    (row,) = fr.trigger_spectrum(Net(), ["body"], twins + v, twins, clean, ks=(1, 4))
    assert row["layer"] == "body" and row["dim"] == 32
    assert row["share@1"] == pytest.approx(1.0, abs=1e-9)
    assert row["reach@1"] > 0.95
    # mean squared displacement 36 against a total clean variance of about 32
    assert row["amplitude"] == pytest.approx(36 / clean.var(0).sum().item(), rel=1e-6)


def test_a_trigger_spread_over_many_directions_has_a_low_top_share():
    twins, clean = _data()
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(32, 16, generator=g))[0].T  # 16 orthonormal directions
    pick = torch.randint(0, 16, (200,), generator=g)
    trig = twins + 3.0 * basis[pick]  # each image moved along one of 16 directions
    (row,) = fr.trigger_spectrum(Net(), ["body"], trig, twins, clean, ks=(1, 16))
    assert row["share@1"] < 0.15
    assert row["share@16"] == pytest.approx(1.0, abs=1e-9)
    assert row["share@1"] < row["share@16"]


def test_a_small_trigger_is_not_reached():
    twins, clean = _data()
    v = torch.zeros(32)
    v[5] = 0.2
    (row,) = fr.trigger_spectrum(Net(), ["body"], twins + v, twins, clean, ks=(1,))
    assert row["share@1"] == pytest.approx(1.0, abs=1e-9)  # repeatable...
    assert row["reach@1"] < 0.1  # ...but under the gate


def test_per_position_rows_and_patch_reach():
    conv = nn.Sequential(nn.Identity(), nn.Conv2d(2, 3, 1))
    g = torch.Generator().manual_seed(0)
    twins, clean = torch.randn(40, 2, 6, 6, generator=g), torch.randn(60, 2, 6, 6, generator=g)
    trig = twins.clone()
    trig[:, 0, 2, 3] += 8.0  # one position, one channel
    (flat,) = fr.trigger_spectrum(conv, ["0"], trig, twins, clean, ks=(1,))
    (pos,) = fr.trigger_spectrum(conv, ["0"], trig, twins, clean, ks=(1,), per_position=True)
    assert flat["dim"] == 72 and pos["dim"] == 2
    assert flat["share@1"] == pytest.approx(1.0, abs=1e-9) and flat["reach@1"] > 0.95
    assert pos["share@1"] == pytest.approx(1.0, abs=1e-9) and pos["reach@1"] > 0.95


def test_tuple_outputs_are_read_like_the_repair_reads_them():
    class Block(nn.Module):
        def forward(self, x):
            return (x, "extra")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)[0].sum(1)

    twins, clean = _data(n=50)
    (row,) = fr.trigger_spectrum(M(), ["block"], twins + 1.0, twins, clean, ks=(1,))
    assert row["share@1"] == pytest.approx(1.0, abs=1e-9)


def test_the_gate_is_centred_and_standardised_on_the_clean_images():
    g = torch.Generator().manual_seed(3)
    scale = torch.ones(32)
    scale[0] = 10.0  # axis 0 varies ten times more than axis 1 on clean images
    shift = torch.zeros(32)
    shift[1] = 50.0  # and axis 1 sits far from the origin
    twins = torch.randn(400, 32, generator=g) * scale + shift
    clean = torch.randn(400, 32, generator=g) * scale + shift
    trig = twins.clone()
    trig[:200, 0] += 6.0  # 0.6 clean std: under a calibrated gate
    trig[200:, 1] -= 6.0  # 6 clean std: over it
    (row,) = fr.trigger_spectrum(Net(), ["body"], trig, twins, clean, ks=(2,))
    assert row["reach@2"] == pytest.approx(0.5, abs=0.06)


def test_tokens_read_like_channels_first():
    g = torch.Generator().manual_seed(4)
    twins, clean = torch.randn(60, 5, 3, generator=g), torch.randn(80, 5, 3, generator=g)
    trig = twins.clone()
    trig[:, 2, 0] += 5.0
    tok = fr.trigger_spectrum(nn.Sequential(nn.Identity()), ["0"], trig, twins, clean, ks=(1, 2),
                              per_position=True, channel_dim=-1)
    chw = fr.trigger_spectrum(nn.Sequential(nn.Identity()), ["0"],
                              *(x.transpose(1, 2).unsqueeze(-1) for x in (trig, twins, clean)),
                              ks=(1, 2), per_position=True, channel_dim=1)
    assert tok[0]["dim"] == chw[0]["dim"] == 3
    for key in ("amplitude", "share@1", "share@2", "reach@1", "reach@2"):
        assert tok[0][key] == pytest.approx(chw[0][key], rel=1e-9)


def test_clean_images_with_other_positions_are_grouped_by_their_own():
    g = torch.Generator().manual_seed(5)
    twins, clean = torch.randn(100, 4, 3, generator=g), torch.randn(100, 8, 3, generator=g)
    trig = twins.clone()
    trig[:, 0, 0] += 3.0
    (row,) = fr.trigger_spectrum(nn.Sequential(nn.Identity()), ["0"], trig, twins, clean, ks=(1,),
                                 per_position=True, channel_dim=-1)
    # the reference: the gate at the 0.99 quantile of each clean image's largest |z| over its 8 tokens
    d = (trig - twins).reshape(-1, 3)
    v = torch.linalg.svd(d.double(), full_matrices=False)[2][:1].T
    c = clean.reshape(-1, 3).double()
    mean = c.mean(0)
    sd = ((c - mean) @ v).std(0)
    zc = (((clean.double() - mean) @ v) / sd).abs().amax((1, 2))
    zt = (((trig.double() - mean) @ v) / sd).abs().amax((1, 2))
    assert row["reach@1"] == pytest.approx((zt > torch.quantile(zc, 0.99)).double().mean().item(), abs=1e-12)


def test_an_attached_layer_is_read_before_its_repair():
    twins, clean = _data()
    v = torch.zeros(32)
    v[5] = 6.0
    model = Net()
    before = fr.trigger_spectrum(model, ["body"], twins + v, twins, clean, ks=(1,))
    est = fr.Estimator(model, layers=["body"], k=1)
    est.observe(clean, poisoned=False)
    est.observe_pairs(twins, twins + v)
    fr.attach(model, est.profile(mode="clamp"))
    after = fr.trigger_spectrum(model, ["body"], twins + v, twins, clean, ks=(1,))
    assert after == before


def test_no_trigger_or_constant_clean_features_give_nan():
    twins, clean = _data(n=20)
    (row,) = fr.trigger_spectrum(Net(), ["body"], twins, twins, clean, ks=(1,))
    assert row["share@1"] != row["share@1"] and row["reach@1"] != row["reach@1"]  # NaN
    (row,) = fr.trigger_spectrum(Net(), ["body"], twins + 1.0, twins, torch.ones(20, 32), ks=(1,))
    assert row["amplitude"] != row["amplitude"] and row["reach@1"] != row["reach@1"]
    assert row["share@1"] == pytest.approx(1.0, abs=1e-9)


def test_refusals():
    twins, clean = _data(n=10)
    with pytest.raises(ValueError, match="pair up"):
        fr.trigger_spectrum(Net(), ["body"], twins[:5], twins, clean)
    with pytest.raises(ValueError, match="no module"):
        fr.trigger_spectrum(Net(), ["nope"], twins, twins, clean)
    with pytest.raises(ValueError, match="positive"):
        fr.trigger_spectrum(Net(), ["body"], twins, twins, clean, ks=(0,))
    with pytest.raises(ValueError, match="positions"):
        fr.trigger_spectrum(Net(), ["body"], twins, twins, clean, per_position=True)
    with pytest.raises(ValueError, match="two pairs"):
        fr.trigger_spectrum(Net(), ["body"], twins[:1], twins[:1], clean)
    with pytest.raises(ValueError, match="positive ints"):
        fr.trigger_spectrum(Net(), ["body"], twins, twins, clean, ks=(1.5,))
    with pytest.raises(ValueError, match="batch"):
        fr.trigger_spectrum(Net(), ["body"], twins, twins, clean, batch=0)
    with pytest.raises(ValueError, match="features per row"):
        fr.trigger_spectrum(nn.Sequential(nn.Identity()), ["0"], twins, twins, torch.randn(10, 9))
    conv = nn.Sequential(nn.Identity())
    maps = torch.randn(10, 2, 3, 3)
    with pytest.raises(ValueError, match="batch dim"):
        fr.trigger_spectrum(conv, ["0"], maps, maps, maps, per_position=True, channel_dim=0)

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Identity()

        def forward(self, x):
            return x
    with pytest.raises(RuntimeError, match="did not run"):
        fr.trigger_spectrum(Skips(), ["unused"], twins, twins, clean)
