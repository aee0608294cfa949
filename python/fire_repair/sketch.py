"""Bounded-memory streaming summaries used by the estimator; each one is mergeable.

- `FrequentDirections` (Liberty, 2013): an l x D sketch B of a stream of rows A with
  0 <= A^T A - B^T B <= ||A||_F^2 / l (in the PSD order); exact while fewer than l rows came,
  and always exact where D fits in the buffer's 2l rows (B is then the square root of the Gram
  matrix A^T A, folded in one D x D eigendecomposition per update).
- `Reservoir`: a uniform sample of at most R rows (Vitter's algorithm R), seeded.
"""
import torch


class FrequentDirections:
    def __init__(self, dim: int, rows: int):
        if rows < 1:
            raise ValueError(f"sketch rows must be >= 1, got {rows}")
        self.dim, self.rows = dim, rows
        self.buffer = torch.zeros(2 * rows, dim, dtype=torch.float32)
        self.filled = 0
        self.seen = 0

    def update(self, a: torch.Tensor) -> None:
        a = a.detach().to(torch.float32, copy=False).reshape(-1, self.dim).cpu()
        self.seen += a.shape[0]
        if self.dim <= self.buffer.shape[0]:
            # per-position statistics stream ~10^6 rows of a few dozen channels: shrinking every l
            # rows cost 88,000 eigendecompositions (45 of the 63 s of a CIFAR-10 fit), while the
            # exact Gram matrix fits in the buffer
            self._fold_exact(a)
            return
        start = 0
        while start < a.shape[0]:
            take = min(a.shape[0] - start, self.buffer.shape[0] - self.filled)
            self.buffer[self.filled:self.filled + take] = a[start:start + take]
            self.filled += take
            start += take
            if self.filled == self.buffer.shape[0]:
                self._shrink()

    def _fold_exact(self, a: torch.Tensor) -> None:
        """B <- the D rows diag(sqrt(lambda)) E^T of B^T B + A^T A = E diag(lambda) E^T (fp64)."""
        b, a = self.buffer[: self.filled].double(), a.double()
        evals, evecs = torch.linalg.eigh(b.T @ b + a.T @ a)
        self.buffer.zero_()
        self.buffer[: self.dim] = (evals.clamp_min(0).sqrt()[:, None] * evecs.T).float()
        self.filled = self.dim

    def _shrink(self) -> None:
        # SVD of the small side: B B^T (2l x 2l) in fp64, so the cost is O(l^2 D).
        b = self.buffer[: self.filled].double()
        evals, evecs = torch.linalg.eigh(b @ b.T)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        sigma = evals.sqrt()
        keep = min(self.rows, self.filled)
        delta = evals[self.rows - 1] if self.filled >= self.rows else evals.new_zeros(())
        shrunk = (evals[:keep] - delta).clamp_min(0).sqrt()
        # rows of B' = diag(shrunk) * (right singular vectors) = diag(shrunk / sigma) U^T B
        scale = torch.where(sigma[:keep] > 0, shrunk / sigma[:keep].clamp_min(1e-300), torch.zeros_like(shrunk))
        new = (scale[:, None] * (evecs[:, :keep].T @ b)).float()
        self.buffer.zero_()
        self.buffer[:keep] = new
        self.filled = keep

    def matrix(self) -> torch.Tensor:
        """The sketch rows B (at most 2l x D): B^T B approximates the stream's A^T A."""
        return self.buffer[: self.filled].clone()

    def state_dict(self) -> dict:
        """Named tensors (copies): the filled sketch rows and the number of rows seen."""
        return {"rows": self.matrix(), "seen": torch.tensor(self.seen, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> "FrequentDirections":
        rows = state["rows"].to(torch.float32)
        if rows.dim() != 2 or rows.shape[1] != self.dim or rows.shape[0] > self.buffer.shape[0]:
            raise ValueError(f"sketch state of shape {tuple(rows.shape)} does not fit a ({self.buffer.shape[0]}, "
                             f"{self.dim}) sketch")
        seen = int(state["seen"])
        if seen < 0 or not bool(torch.isfinite(rows).all()):
            raise ValueError(f"sketch state with seen = {seen} (or non-finite rows) is not a sketch's")
        self.buffer.zero_()
        self.buffer[: rows.shape[0]] = rows
        self.filled, self.seen = rows.shape[0], seen
        return self

    def merge(self, other: "FrequentDirections") -> None:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge sketches of dimension {self.dim} and {other.dim}")
        seen = self.seen + other.seen
        self.update(other.matrix())
        self.seen = seen


class Reservoir:
    def __init__(self, dim: int, capacity: int, seed: int = 0):
        self.dim, self.capacity = dim, capacity
        self.rows = torch.zeros(0, dim, dtype=torch.float32)
        self.seen = 0
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, a: torch.Tensor) -> None:
        a = a.detach().to(torch.float32).reshape(-1, self.dim).cpu()
        room = self.capacity - self.rows.shape[0]
        if room > 0:
            self.rows = torch.cat([self.rows, a[:room]])
            self.seen += min(room, a.shape[0])
            a = a[room:]
        if a.shape[0] == 0:
            return
        # once full, row i of the stream replaces a random slot with probability R / i
        position = self.seen + torch.arange(1, a.shape[0] + 1, dtype=torch.float64)
        slot = (torch.rand(a.shape[0], generator=self.gen, dtype=torch.float64) * position).long()
        self.seen += a.shape[0]
        for i in torch.nonzero(slot < self.capacity).flatten().tolist():  # in stream order
            self.rows[slot[i]] = a[i]

    def state_dict(self) -> dict:
        """Named tensors (copies): the kept rows and the number of rows seen."""
        return {"rows": self.rows.clone(), "seen": torch.tensor(self.seen, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> "Reservoir":
        rows = state["rows"].to(torch.float32)
        if rows.dim() != 2 or rows.shape[1] != self.dim or rows.shape[0] > self.capacity:
            raise ValueError(f"reservoir state of shape {tuple(rows.shape)} does not fit {self.capacity} rows of "
                             f"{self.dim}")
        seen = int(state["seen"])
        if seen < 0 or rows.shape[0] > min(seen, self.capacity) or not bool(torch.isfinite(rows).all()):
            raise ValueError(f"reservoir state of {rows.shape[0]} rows having seen {seen} (or non-finite rows) is not "
                             f"a reservoir of {self.capacity}'s")
        self.rows, self.seen = rows.clone(), seen
        return self

    def merge(self, other: "Reservoir") -> None:
        """A sample of the union: each side contributes in proportion to the rows it saw
        (exact concatenation while both fit)."""
        total = self.seen + other.seen
        if self.rows.shape[0] + other.rows.shape[0] <= self.capacity:
            self.rows = torch.cat([self.rows, other.rows])
        else:
            mine = round(self.capacity * self.seen / max(total, 1))
            mine = min(mine, self.rows.shape[0])
            theirs = min(self.capacity - mine, other.rows.shape[0])
            pick_a = torch.randperm(self.rows.shape[0], generator=self.gen)[:mine]
            pick_b = torch.randperm(other.rows.shape[0], generator=self.gen)[:theirs]
            self.rows = torch.cat([self.rows[pick_a], other.rows[pick_b]])
        self.seen = total
