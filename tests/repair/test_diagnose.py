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
