"""How an activation-patching sweep's cells are laid out: position groups, suffixes packed into
rows, and the shape buckets that let sweeps of similar sizes share a compiled program.

Owns: `position_groups` (cell position masks), `Packing` and `pack_cells` (first-fit
decreasing packing of the cells' suffixes into rows of equal length), `bucket_size` and
`pad_packing` (a packing padded to its bucket).
Must not: run models (`probes.patching` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


def position_groups(seq_len: int, positions=None) -> np.ndarray:
  """Cell position masks, bool [C, T] or [C, B, T]: None = every position its own cell; a list
  of ints = those positions, one cell each; a bool array [C, T] / [C, B, T] = given groups (e.g.
  each item's subject tokens, the last token, all tokens)."""
  if positions is None:
    return np.eye(seq_len, dtype=bool)
  arr = np.asarray(positions)
  if arr.dtype == bool:
    if arr.shape[-1] != seq_len or arr.ndim not in (2, 3):
      raise ValueError(f"position groups have shape {arr.shape}; expected [cells, {seq_len}] "
                       f"or [cells, batch, {seq_len}]")
    return arr
  if arr.ndim != 1 or (arr.size and (arr.max() >= seq_len or arr.min() < -seq_len)):
    raise ValueError(f"positions {arr.tolist()} out of range for {seq_len} tokens")
  return np.eye(seq_len, dtype=bool)[arr % seq_len]


class Packing(NamedTuple):
  """How a sweep's cells are laid out: cell c recomputes only its suffix (positions ≥ its
  start), and suffixes are packed into rows of R tokens, k cells at most per row.

  Arrays per packed row r (numpy): pos [Rn, R] position of each packed token; start [Rn, R]
  the start of the token's cell; slot [Rn, R] the token's cell within the row (k = padding);
  patch [Rn, B, R] whether the token is patched; logit [Rn, k, P] packed index of each cell's
  metric positions. flat [C]: cell c's output is row-major entry (r, slot) of [Rn, k]."""
  pos: np.ndarray
  start: np.ndarray
  slot: np.ndarray
  patch: np.ndarray
  logit: np.ndarray
  flat: np.ndarray
  tokens: int        # packed token slots per batch element (Rn * R)
  computed: int      # real (cell, position) pairs among them


def pack_cells(cells_CxBxT: np.ndarray, logit_positions: Sequence[int]) -> Packing:
  """Lay out the cells of a sweep (first-fit decreasing; a row of T + 1 tokens holds the
  suffixes of the cells patched from t and T−1−t). A cell starts at its first patched position
  over the batch (nothing before it can change), or at the first metric position if earlier."""
  C, B, T = cells_CxBxT.shape
  logit_P = np.asarray([int(p) % T for p in logit_positions])
  any_CxT = cells_CxBxT.any(axis=1)
  start_C = np.where(any_CxT.any(axis=1), any_CxT.argmax(axis=1), T)
  start_C = np.minimum(start_C, logit_P.min())
  n_C = T - start_C
  R = int(n_C.max() + n_C.min()) if n_C.max() + n_C.min() <= T + 1 else int(n_C.max())
  rows, room = [], []                 # rows: lists of cells; room: free tokens per row
  for c in np.argsort(-n_C, kind="stable"):
    for r, free in enumerate(room):
      if free >= n_C[c]:
        break
    else:
      rows.append([])
      room.append(R)
      r = len(rows) - 1
    rows[r].append(int(c))
    room[r] -= int(n_C[c])
  Rn, k = len(rows), max(len(r) for r in rows)
  pos = np.zeros((Rn, R), np.int32)
  start = np.zeros((Rn, R), np.int32)
  slot = np.full((Rn, R), k, np.int32)
  patch = np.zeros((Rn, B, R), bool)
  logit = np.zeros((Rn, k, len(logit_P)), np.int32)
  flat = np.zeros(C, np.int32)
  for r, row in enumerate(rows):
    o = 0
    for j, c in enumerate(row):
      s, n = int(start_C[c]), int(n_C[c])
      pos[r, o:o + n] = np.arange(s, T)
      start[r, o:o + n] = s
      slot[r, o:o + n] = j
      patch[r, :, o:o + n] = cells_CxBxT[c, :, s:]
      logit[r, j] = o + logit_P - s
      flat[c] = r * k + j
      o += n
  return Packing(pos, start, slot, patch, logit, flat, Rn * R, int(n_C.sum()))



def bucket_size(n: int) -> int:
  """The shape bucket of a sweep dimension of size n: n itself up to 4, above it the next of
  5, 6, 7, 8, 10, 12, 14, 16, 20, ... (four per octave: at most 25% padding)."""
  n = int(n)
  if n <= 4:
    return n
  step = 1 << max((n - 1).bit_length() - 3, 0)
  return -(-n // step) * step


def pad_packing(pk: Packing, rows: int, length: int, per_row: int, cells: int) -> Packing:
  """`pk` with its arrays padded to [rows, length] tokens, `per_row` cells a row and `cells`
  outputs: padding tokens belong to no cell (slot = per_row, attend to nothing), padding rows
  hold none, padding outputs read entry 0 (and are sliced off by the caller)."""
  Rn, R = pk.pos.shape
  k = pk.logit.shape[1]
  grow = ((0, rows - Rn), (0, length - R))
  slot = np.where(pk.slot == k, per_row, pk.slot)
  r_C, j_C = np.divmod(pk.flat, k)
  return pk._replace(
      pos=np.pad(pk.pos, grow), start=np.pad(pk.start, grow),
      slot=np.pad(slot, grow, constant_values=per_row),
      patch=np.pad(pk.patch, ((0, rows - Rn), (0, 0), (0, length - R))),
      logit=np.pad(pk.logit, ((0, rows - Rn), (0, per_row - k), (0, 0))),
      flat=np.pad((r_C * per_row + j_C).astype(np.int32), (0, cells - len(pk.flat))))
