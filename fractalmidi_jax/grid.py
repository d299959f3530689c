"""Geometry of a level: a canvas of rows x cols patches of side p.

Tokens are numbered in grid order t = r * cols + c (r = pitch band, c = time patch).
Scan orders (AR levels): row_major visits t in grid order (every time patch of band 0, then
band 1, ...); column_major visits every band of time patch 0, then time patch 1, so a time
prefix is a scan prefix. Neighbours are listed as (top, right, bottom, left) = (r-1, c),
(r, c+1), (r+1, c), (r, c-1); -1 marks the border.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

NEIGHBOURS = ("top", "right", "bottom", "left")


@dataclasses.dataclass(frozen=True)
class Grid:
    rows: int
    cols: int
    patch: int

    @property
    def num_tokens(self) -> int:
        return self.rows * self.cols

    def scan_order(self, order: str) -> np.ndarray:
        """scan[i] = grid index of the i-th token visited."""
        r, c = np.meshgrid(np.arange(self.rows), np.arange(self.cols), indexing="ij")
        grid_index = r * self.cols + c
        return (grid_index if order == "row_major" else grid_index.T).reshape(-1).astype(np.int32)

    def neighbours(self) -> np.ndarray:
        """[4, L] grid index of each token's top, right, bottom and left neighbour (-1 = none)."""
        r, c = np.meshgrid(np.arange(self.rows), np.arange(self.cols), indexing="ij")
        out = []
        for dr, dc in ((-1, 0), (0, 1), (1, 0), (0, -1)):
            rr, cc = r + dr, c + dc
            inside = (rr >= 0) & (rr < self.rows) & (cc >= 0) & (cc < self.cols)
            out.append(np.where(inside, rr * self.cols + cc, -1).reshape(-1))
        return np.stack(out).astype(np.int32)


def patchify(x_NxHxW, p: int):
    """N x H x W -> N x (H/p * W/p) x (p*p), tokens in grid order, pixels row-major."""
    n, h, w = x_NxHxW.shape
    x = x_NxHxW.reshape(n, h // p, p, w // p, p)
    return x.transpose(0, 1, 3, 2, 4).reshape(n, (h // p) * (w // p), p * p)


def unpatchify(x_NxLxP, rows: int, cols: int, p: int):
    n = x_NxLxP.shape[0]
    x = x_NxLxP.reshape(n, rows, cols, p, p)
    return x.transpose(0, 1, 3, 2, 4).reshape(n, rows * p, cols * p)


def gather_tokens(x_NxLx___, index_NxK):
    """x[n, index[n, k]] for every n, k."""
    index = index_NxK.reshape(index_NxK.shape + (1,) * (x_NxLx___.ndim - 2))
    return jnp.take_along_axis(x_NxLx___, index, axis=1)


def put_tokens(x_NxLx___, index_NxK, values_NxKx___):
    """x with x[n, index[n, k]] = values[n, k]."""
    n = x_NxLx___.shape[0]
    return x_NxLx___.at[jnp.arange(n)[:, None], index_NxK].set(values_NxKx___)
