"""Layer statistics across the ranks of a torch.distributed group, with tensor collectives only
(nothing is pickled)."""
import torch

from .stats import stats_from_state_dict


def all_reduce_stats(stats: dict, layers, group=None) -> dict:
    """{layer: statistics} merged over all ranks of `group` in rank order, for each of `layers`:
    every rank gets the same statistics. Refused where this rank observed nothing at a layer."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = dict(stats)
    for name in layers:
        mine = stats.get(name)
        if mine is None:
            raise RuntimeError(f"rank {dist.get_rank(group)} has observed nothing at {name!r}")
        gathered = [gather_stats(mine, src, group) for src in range(world)]
        total = gathered[0]
        for other in gathered[1:]:
            total.merge(other)
        out[name] = total
    return out


def gather_stats(stats, src: int, group=None):
    """A copy of rank `src`'s statistics (LayerStats or PositionStats) on every rank: every
    rank has the same state keys and dtypes, so only the shapes travel first (one int64
    tensor), then each tensor."""
    import torch.distributed as dist

    state = stats.state_dict()
    names = sorted(state)
    shapes = torch.zeros(len(names), 3, dtype=torch.int64)  # ndim, then up to two sizes
    for i, name in enumerate(names):
        t = state[name]
        shapes[i, 0] = t.dim()
        shapes[i, 1:1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.broadcast(shapes, src, group=group)
    out = {}
    for i, name in enumerate(names):
        shape = shapes[i, 1:1 + int(shapes[i, 0])].tolist()
        t = state[name] if dist.get_rank(group) == src else torch.empty(shape, dtype=state[name].dtype)
        dist.broadcast(t, src, group=group)
        out[name] = t
    return stats_from_state_dict(out)
