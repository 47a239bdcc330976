"""Per-site banks: every task version owns one row; row 0 holds the base values.

For each site that at least one loaded task changes, a bank ``[capacity, dim]`` holds one vector
per row; a task's untrained sites copy the base values, so a gather by row is always right.
Sites that no task changes stay un-banked and use the shared base vector with no gather.
Heads are banked per width class (powers of two, ``head_width``): class ``w`` holds
``[slots, w, H]`` weights and ``[slots, w]`` biases, one slot per task whose label count rounds
up to ``w``; each row records its class and slot, its label count and its pooling code. A task
with 1,000 labels pays for its own 1,024-wide slot, not every other task (one head bank padded to
the widest task made every row 1,000 labels wide), and a class is dropped when its last task goes.

Concurrency contract (vLLM-style slots): mutations are serialized by a lock; a forward works on a
:class:`BankView` snapshot taken when it starts. Growth and new banks build new tensors and swap
the view, so an in-flight forward keeps valid tensors. A row is written only while no batch uses
it (the registry frees rows only when they are idle), so in-place row writes never race a reader.
"""

from __future__ import annotations

import ctypes
import dataclasses
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


def head_width(num_labels: int) -> int:
    """The width class of a head: the smallest power of two that holds its labels. Heads are
    banked per class, so a task pays for at most twice its own width and never for another's."""
    return 1 << max(0, num_labels - 1).bit_length()


def _initial_slots(width: int) -> int:
    """Slots a new width class starts with: a few for narrow heads (cheap), one for wide ones."""
    return 8 if width <= 64 else 1


@dataclass(frozen=True)
class HeadBank:
    """The heads of one width class: slot ``s`` holds one task's head, zero-padded to ``width``."""

    weight: torch.Tensor  # [slots, width, H]
    bias: torch.Tensor  # [slots, width]

    @property
    def width(self) -> int:
        return self.weight.shape[1]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.bias.numel() * self.bias.element_size()


@dataclass(frozen=True)
class BankView:
    """An immutable snapshot of the banks for one forward pass."""

    sites: Mapping[str, torch.Tensor]  # site name -> [capacity, dim]; only sites some task changes
    heads: Mapping[int, HeadBank]  # width class -> its heads; only classes some task uses
    num_labels: torch.Tensor  # [capacity] long
    pooling: torch.Tensor  # [capacity] long, codes of POOLING_CODES
    # Per row as Python ints, read by the forward with no device sync: label count, pooling code,
    # head width class (0 for a free row) and slot in that class (written in place with the tensors).
    row_labels: list[int]
    row_pooling: list[int]
    row_width: list[int]
    row_slot: list[int]


class _Slots:
    """Slot bookkeeping of one width class (the tensors live in the view)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.free: list[int] = []
        self.next = 0
        self.used = 0

    def take(self) -> int | None:
        """A free slot, or None when the class must grow first."""
        if self.free:
            slot = self.free.pop()
        elif self.next < self.capacity:
            slot, self.next = self.next, self.next + 1
        else:
            return None
        self.used += 1
        return slot


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
        self._slots: dict[int, _Slots] = {}  # width class -> its slots
        self._view = BankView(
            sites={},
            heads={},
            num_labels=torch.ones(self._capacity, dtype=torch.long, device=device),
            pooling=torch.zeros(self._capacity, dtype=torch.long, device=device),
            row_labels=[1] * self._capacity,
            row_pooling=[0] * self._capacity,
            row_width=[0] * self._capacity,
            row_slot=[0] * self._capacity,
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
        tensors = [*v.sites.values(), v.num_labels, v.pooling]
        return sum(t.numel() * t.element_size() for t in tensors) + sum(h.nbytes for h in v.heads.values())

    @property
    def bytes_per_row(self) -> int:
        """What every row costs whatever its head: the banked sites plus its label count and pooling code."""
        v = self._view
        return sum(bank.shape[1] * bank.element_size() for bank in v.sites.values()) + 2 * v.pooling.element_size()

    def head_bytes(self, num_labels: int) -> int:
        """What one head of ``num_labels`` labels costs in its width class."""
        return head_width(num_labels) * (self._hidden + 1) * self._dtype.itemsize

    def bytes_after(self, delta: Delta) -> int:
        """``nbytes`` once ``delta`` has a new row (what allocate + write would grow), for budgets."""
        with self._lock:
            v = self._view
            capacity = self._capacity
            if not self._free_rows and self._next_row == capacity:
                capacity = grown_capacity(capacity)
            itemsize = self._dtype.itemsize
            dims = {name: bank.shape[1] for name, bank in v.sites.items()}
            dims.update({name: self._base[name].shape[0] for name in delta.sites})
            total = capacity * (sum(dims.values()) * itemsize + 2 * v.pooling.element_size())
            width = head_width(delta.num_labels)
            for w, head in v.heads.items():
                slots = self._slots[w]
                full = w == width and not slots.free and slots.next == slots.capacity
                total += (grown_capacity(slots.capacity) if full else slots.capacity) * self.head_bytes(w)
            if width not in v.heads:
                total += _initial_slots(width) * self.head_bytes(width)
            return total

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
        """Fill ``row`` with the delta's values: its sites, base values elsewhere, its head in a
        slot of its width class."""
        with self._lock:
            assert 0 < row < self._next_row, f"row {row} was not allocated"
            new_sites = [s for s in delta.sites if s not in self._view.sites]
            if new_sites:
                self._rebuild(self._capacity, new_sites=new_sites)
            v = self._view
            for name, bank in v.sites.items():
                bank[row] = delta.sites.get(name, self._base[name])
            if v.row_width[row]:
                self._release_head(row)
            n = delta.num_labels
            width = head_width(n)
            slot = self._take_slot(width)
            v = self._view  # a new or grown class swapped the view
            head = v.heads[width]
            head.weight[slot].zero_()
            head.bias[slot].zero_()
            head.weight[slot, :n] = delta.head_weight
            head.bias[slot, :n] = delta.head_bias
            v.row_width[row], v.row_slot[row] = width, slot
            v.num_labels[row] = v.row_labels[row] = n
            v.pooling[row] = v.row_pooling[row] = POOLING_CODES[delta.pooling]

    def free(self, row: int) -> None:
        """Reset the row to base values (nothing of the old task can leak) and make it reusable;
        its head's slot goes back to its width class, and a class left empty is dropped."""
        with self._lock:
            v = self._view
            for name, bank in v.sites.items():
                bank[row] = self._base[name]
            if v.row_width[row]:
                self._release_head(row)
            v.num_labels[row] = v.row_labels[row] = 1
            v.pooling[row] = v.row_pooling[row] = 0
            self._free_rows.append(row)

    # ------------------------------------------------------------------ internals (lock held)
    def _take_slot(self, width: int) -> int:
        slots = self._slots.get(width)
        if slots is None:
            slots = self._slots[width] = _Slots(_initial_slots(width))
            self._swap_heads({**self._view.heads, width: self._new_head_bank(width, slots.capacity)})
        slot = slots.take()
        if slot is None:  # full: grow this class only
            old = self._view.heads[width]
            slots.capacity = grown_capacity(slots.capacity)
            grown = self._new_head_bank(width, slots.capacity)
            grown.weight[:old.weight.shape[0]] = old.weight
            grown.bias[:old.bias.shape[0]] = old.bias
            self._swap_heads({**self._view.heads, width: grown})
            slot = slots.take()
        return slot

    def _release_head(self, row: int) -> None:
        v = self._view
        width, slot = v.row_width[row], v.row_slot[row]
        head, slots = v.heads[width], self._slots[width]
        head.weight[slot].zero_()
        head.bias[slot].zero_()
        slots.free.append(slot)
        slots.used -= 1
        v.row_width[row] = v.row_slot[row] = 0
        if slots.used == 0:  # the class's last task left: its memory goes back
            del self._slots[width]
            self._swap_heads({w: h for w, h in v.heads.items() if w != width})

    def _new_head_bank(self, width: int, slots: int) -> HeadBank:
        return HeadBank(weight=torch.zeros(slots, width, self._hidden, device=self._device, dtype=self._dtype),
                        bias=torch.zeros(slots, width, device=self._device, dtype=self._dtype))

    def _swap_heads(self, heads: dict[int, HeadBank]) -> None:
        """A new view with other head classes; an in-flight forward keeps the old one."""
        self._view = dataclasses.replace(self._view, heads=heads)
        release_freed_memory()

    def _grow(self, capacity: int) -> None:
        self._rebuild(capacity, new_sites=[])

    def _rebuild(self, capacity: int, new_sites: list[str]) -> None:
        """Copy every site bank into fresh tensors (bigger and/or with new sites), then swap the
        view. Heads live per width class, by slot, and are not touched."""
        old = self._view
        old_cap = old.num_labels.shape[0]

        def grown(t: torch.Tensor, fill: torch.Tensor | float) -> torch.Tensor:
            new = torch.empty((capacity, *t.shape[1:]), device=t.device, dtype=t.dtype)
            new[:old_cap] = t
            new[old_cap:] = fill
            return new

        sites = {name: grown(bank, self._base[name]) for name, bank in old.sites.items()}
        for name in new_sites:
            sites[name] = self._base[name].unsqueeze(0).repeat(capacity, 1)
        extra = capacity - old_cap
        self._view = BankView(
            sites=sites,
            heads=old.heads,
            num_labels=grown(old.num_labels, 1),
            pooling=grown(old.pooling, 0),
            row_labels=old.row_labels + [1] * extra,
            row_pooling=old.row_pooling + [0] * extra,
            row_width=old.row_width + [0] * extra,
            row_slot=old.row_slot + [0] * extra,
        )
        self._capacity = capacity
        del old  # a forward still running keeps its own view; its pages go at a later trim
        release_freed_memory()
