"""Per-site banks: every task version owns one row; row 0 holds the base values.

For each site that at least one loaded task changes, a bank ``[capacity, dim]`` holds one vector
per row; a task's untrained sites copy the base values, so a gather by row is always right.
Sites that no task changes stay un-banked and use the shared base vector with no gather.
Heads: ``[capacity, C_max, H]`` weights, ``[capacity, C_max]`` biases, a label count and a pooling
code per row.

Concurrency contract (vLLM-style slots): mutations are serialized by a lock; a forward works on a
:class:`BankView` snapshot taken when it starts. Growth and new banks build new tensors and swap
the view, so an in-flight forward keeps valid tensors. A row is written only while no batch uses
it (the registry frees rows only when they are idle), so in-place row writes never race a reader.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from typing import Mapping

import torch

from bitfit_serve.delta import Delta

POOLING_CODES = {"pooler": 0, "cls": 1, "mean": 2}
GROWTH_MIN_ROWS = 64


def grown_capacity(capacity: int) -> int:
    """The next capacity when every row is taken: doubling while small, then +1/8 (at least
    GROWTH_MIN_ROWS rows). Rows are filled with base values, so every row costs resident memory:
    doubling would leave up to half of a large bank unused (10,000 tasks -> 16,384 rows), +1/8 at
    most ~11% (-> 11,072 rows), for a few more (amortised O(1)) copies while growing."""
    return capacity + min(capacity, max(GROWTH_MIN_ROWS, capacity // 8))


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (macOS, musl): nothing to do


def release_freed_memory() -> None:
    """Return the pages of replaced banks to the OS. glibc keeps freed heap memory for reuse, and
    an old bank never fits the bigger new one, so without this resident memory keeps about one
    old copy of the banks (10,000 MiniLM tasks: RSS +2.3 GiB for 1.1 GiB of banks)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass(frozen=True)
class BankView:
    """An immutable snapshot of the banks for one forward pass."""

    sites: Mapping[str, torch.Tensor]  # site name -> [capacity, dim]; only sites some task changes
    head_weight: torch.Tensor  # [capacity, C_max, H]
    head_bias: torch.Tensor  # [capacity, C_max]
    num_labels: torch.Tensor  # [capacity] long
    pooling: torch.Tensor  # [capacity] long, codes of POOLING_CODES
    # The same two per row as Python ints, for a single-task batch's fast path: reading them
    # needs no device sync (written in place with the tensors, like every row).
    row_labels: list[int]
    row_pooling: list[int]


class Banks:
    def __init__(self, base_sites: Mapping[str, torch.Tensor], hidden_size: int,
                 device: torch.device, dtype: torch.dtype, initial_capacity: int = 8):
        self._base = {name: t.to(device=device, dtype=dtype) for name, t in base_sites.items()}
        self._hidden = hidden_size
        self._device, self._dtype = device, dtype
        self._lock = threading.Lock()
        self._capacity = max(2, initial_capacity)
        self._free_rows: list[int] = []
        self._next_row = 1  # row 0 is the base
        self._view = BankView(
            sites={},
            head_weight=torch.zeros(self._capacity, 1, hidden_size, device=device, dtype=dtype),
            head_bias=torch.zeros(self._capacity, 1, device=device, dtype=dtype),
            num_labels=torch.ones(self._capacity, dtype=torch.long, device=device),
            pooling=torch.zeros(self._capacity, dtype=torch.long, device=device),
            row_labels=[1] * self._capacity,
            row_pooling=[0] * self._capacity,
        )

    # ------------------------------------------------------------------ queries
    def view(self) -> BankView:
        return self._view

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def rows_in_use(self) -> int:
        return self._next_row - 1 - len(self._free_rows)

    @property
    def nbytes(self) -> int:
        v = self._view
        tensors = [*v.sites.values(), v.head_weight, v.head_bias, v.num_labels, v.pooling]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def bytes_per_row(self) -> int:
        return self.nbytes // self._capacity

    # ------------------------------------------------------------------ mutations
    def allocate(self) -> int:
        with self._lock:
            if self._free_rows:
                return self._free_rows.pop()
            if self._next_row == self._capacity:
                self._grow(grown_capacity(self._capacity))
            row = self._next_row
            self._next_row += 1
            return row

    def write(self, row: int, delta: Delta) -> None:
        """Fill ``row`` with the delta's values: its sites, base values elsewhere, its head."""
        with self._lock:
            assert 0 < row < self._next_row, f"row {row} was not allocated"
            new_sites = [s for s in delta.sites if s not in self._view.sites]
            c = max(delta.num_labels, self._view.head_weight.shape[1])
            if new_sites or c > self._view.head_weight.shape[1]:
                self._rebuild(self._capacity, new_sites=new_sites, max_labels=c)
            v = self._view
            for name, bank in v.sites.items():
                bank[row] = delta.sites.get(name, self._base[name])
            n = delta.num_labels
            v.head_weight[row].zero_()
            v.head_bias[row].zero_()
            v.head_weight[row, :n] = delta.head_weight
            v.head_bias[row, :n] = delta.head_bias
            v.num_labels[row] = v.row_labels[row] = n
            v.pooling[row] = v.row_pooling[row] = POOLING_CODES[delta.pooling]

    def free(self, row: int) -> None:
        """Reset the row to base values (nothing of the old task can leak) and make it reusable."""
        with self._lock:
            v = self._view
            for name, bank in v.sites.items():
                bank[row] = self._base[name]
            v.head_weight[row].zero_()
            v.head_bias[row].zero_()
            v.num_labels[row] = v.row_labels[row] = 1
            v.pooling[row] = v.row_pooling[row] = 0
            self._free_rows.append(row)

    # ------------------------------------------------------------------ internals (lock held)
    def _grow(self, capacity: int) -> None:
        self._rebuild(capacity, new_sites=[], max_labels=self._view.head_weight.shape[1])

    def _rebuild(self, capacity: int, new_sites: list[str], max_labels: int) -> None:
        """Copy every bank into fresh tensors (bigger and/or with new sites), then swap the view."""
        old = self._view
        old_cap, old_c = old.head_weight.shape[0], old.head_weight.shape[1]

        def grown(t: torch.Tensor, fill: torch.Tensor | float) -> torch.Tensor:
            new = torch.empty((capacity, *t.shape[1:]), device=t.device, dtype=t.dtype)
            new[:old_cap] = t
            new[old_cap:] = fill
            return new

        sites = {name: grown(bank, self._base[name]) for name, bank in old.sites.items()}
        for name in new_sites:
            sites[name] = self._base[name].unsqueeze(0).repeat(capacity, 1)
        head_weight = torch.zeros(capacity, max_labels, self._hidden, device=self._device, dtype=self._dtype)
        head_bias = torch.zeros(capacity, max_labels, device=self._device, dtype=self._dtype)
        head_weight[:old_cap, :old_c] = old.head_weight
        head_bias[:old_cap, :old_c] = old.head_bias
        self._view = BankView(
            sites=sites,
            head_weight=head_weight,
            head_bias=head_bias,
            num_labels=grown(old.num_labels, 1),
            pooling=grown(old.pooling, 0),
            row_labels=old.row_labels + [1] * (capacity - old_cap),
            row_pooling=old.row_pooling + [0] * (capacity - old_cap),
        )
        self._capacity = capacity
        del old  # a forward still running keeps its own view; its pages go at a later trim
        release_freed_memory()
