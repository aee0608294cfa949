"""The streaming summaries: Frequent Directions' error bound, its exact regime, merge and state."""
import torch

from fire_repair.sketch import FrequentDirections


def _gram(a):
    return a.double().T @ a.double()


def _stream(fd, a, batch):
    for i in range(0, len(a), batch):
        fd.update(a[i:i + batch])
    return fd


def test_frequent_directions_error_bound_when_the_dimension_exceeds_the_buffer():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 40, generator=g) @ torch.randn(40, 40, generator=g)
    fd = _stream(FrequentDirections(40, 8), a, 37)  # buffer 16 rows < D = 40: shrinking
    err = torch.linalg.eigvalsh(_gram(a) - _gram(fd.matrix()))
    mass = (a.double() ** 2).sum()
    assert err.min() >= -1e-6 * mass  # B^T B never exceeds A^T A (up to fp32 rounding)
    assert err.max() <= mass / 8  # ... and misses at most ||A||_F^2 / l
    assert fd.seen == 500 and fd.matrix().shape[0] <= 16


def test_frequent_directions_is_exact_where_the_dimension_fits_the_buffer():
    g = torch.Generator().manual_seed(1)
    a = 3 + torch.randn(100_000, 24, generator=g)  # e.g. positions x channels
    fd = _stream(FrequentDirections(24, 16), a, 4096)  # buffer 32 rows >= D = 24
    torch.testing.assert_close(_gram(fd.matrix()), _gram(a), rtol=1e-5, atol=1e-3)
    assert fd.seen == 100_000 and fd.matrix().shape == (24, 24)


def test_frequent_directions_merge_and_state_round_trip():
    g = torch.Generator().manual_seed(2)
    for dim, rows in ((12, 8), (50, 8)):  # exact, shrinking
        a, b = torch.randn(300, dim, generator=g), torch.randn(200, dim, generator=g)
        left, right = _stream(FrequentDirections(dim, rows), a, 64), _stream(FrequentDirections(dim, rows), b, 64)
        left.merge(right)
        assert left.seen == 500
        err = torch.linalg.eigvalsh(_gram(torch.cat([a, b])) - _gram(left.matrix()))
        mass = (torch.cat([a, b]).double() ** 2).sum()
        assert err.min() >= -1e-6 * mass and err.max() <= mass / rows
        back = FrequentDirections(dim, rows).load_state_dict(left.state_dict())
        assert torch.equal(back.matrix(), left.matrix()) and back.seen == left.seen
