"""Replay storage shared by every replay competitor, and the policies that pick which slot to write.

``ReplayBuffer`` stores inputs and labels in fixed-size tensors on the run's device and counts the
stream samples it has been offered; *which* slot an incoming sample takes (or whether it is dropped)
is delegated to a small policy object, so reservoir, random and class-balanced replay share one store:

* ``reservoir`` — Vitter's algorithm R (Vitter 1985, "Random sampling with a reservoir");
* ``random`` — fill, then keep each incoming sample with probability 1/2 in a uniform slot;
* ``class_balanced`` — GDumb's greedy class-balanced memory (Prabhu et al. 2020).

Policies decide from Python-side bookkeeping (slot labels mirrored on the CPU), so choosing a slot never
waits on the device. Every random draw uses the ``torch.Generator`` handed in (a CPU generator).
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import torch

from memhead.registry import Registry


class SlotPolicy(Protocol):
    """Chooses where an incoming sample goes: a slot index, or ``None`` to drop it."""

    def choose_slot(self, buffer: ReplayBuffer, label: int, generator: torch.Generator) -> int | None: ...


def _uniform_int(high: int, generator: torch.Generator) -> int:
    """One integer drawn uniformly in ``[0, high)``."""
    return int(torch.randint(high, (), generator=generator))


class ReservoirPolicy:
    """Algorithm R: after ``n`` samples seen, the next one replaces slot ``j ~ U[0, n]`` if ``j < size``."""

    def choose_slot(self, buffer: ReplayBuffer, label: int, generator: torch.Generator) -> int | None:
        if not buffer.is_full:
            return buffer.filled
        slot = _uniform_int(buffer.seen + 1, generator)
        return slot if slot < buffer.size else None


class RandomPolicy:
    """Fill, then keep each sample with probability 1/2 in a uniform slot (biased towards recent data)."""

    def choose_slot(self, buffer: ReplayBuffer, label: int, generator: torch.Generator) -> int | None:
        if not buffer.is_full:
            return buffer.filled
        if _uniform_int(2, generator) == 0:
            return None
        return _uniform_int(buffer.size, generator)


class ClassBalancedPolicy:
    """GDumb's greedy rule: store a sample whose class holds fewer than ``size // classes`` slots.

    ``classes`` counts the classes already in memory. When memory is full, a uniformly random sample of
    the largest class (the smallest label among equally large ones) makes room.
    """

    def choose_slot(self, buffer: ReplayBuffer, label: int, generator: torch.Generator) -> int | None:
        counts = Counter(buffer.slot_labels)
        share = buffer.size // max(1, len(counts))
        if label in counts and counts[label] >= share:
            return None
        if not buffer.is_full:
            return buffer.filled
        largest = max(counts.values())
        victim_class = min(c for c, n in counts.items() if n == largest)
        victim_slots = [slot for slot, c in enumerate(buffer.slot_labels) if c == victim_class]
        return victim_slots[_uniform_int(len(victim_slots), generator)]


POLICIES: Registry[type] = Registry("buffer policy")
POLICIES.register("reservoir")(ReservoirPolicy)
POLICIES.register("random")(RandomPolicy)
POLICIES.register("class_balanced")(ClassBalancedPolicy)


class ReplayBuffer:
    """A fixed number of ``(input, label)`` slots on one device, filled through a :class:`SlotPolicy`.

    The input tensor is allocated at the first write, when the input shape and dtype become known.

    Args:
        size: number of slots (samples), at least 1.
        device: where the stored tensors live.
        policy: the slot policy, or its name (``reservoir``, ``random``, ``class_balanced``).

    Attributes:
        inputs: ``(size, *input_shape)`` stored inputs (``None`` before the first write); rows
            ``[0, filled)`` are valid.
        labels: ``(size,)`` int64 stored labels.
        filled: number of valid slots.
        seen: number of samples offered to ``add`` so far.
        slot_labels: the labels of the valid slots, as Python ints (the policies' view).
    """

    def __init__(self, size: int, device: torch.device | str, policy: SlotPolicy | str = "reservoir") -> None:
        if size < 1:
            raise ValueError(f"a replay buffer needs at least one slot (got {size})")
        self.size = size
        self.device = torch.device(device)
        self.policy = POLICIES.get(policy)() if isinstance(policy, str) else policy
        self.inputs: torch.Tensor | None = None
        self.labels = torch.zeros(size, dtype=torch.long, device=self.device)
        self.slot_labels: list[int] = []
        self.seen = 0

    @property
    def filled(self) -> int:
        return len(self.slot_labels)

    @property
    def is_full(self) -> bool:
        return self.filled == self.size

    def add(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        """Offer each sample of the batch ``x: (b, ...)``, ``y: (b,)`` to the policy, in order."""
        x = x.detach().to(self.device)
        y = y.detach().to(self.device)
        for i, label in enumerate(y.tolist()):
            slot = self.offer(label, generator)
            if slot is not None:
                self.write(slot, x[i], y[i])

    def offer(self, label: int, generator: torch.Generator) -> int | None:
        """The policy's slot for one incoming sample of class ``label`` (``None``: dropped), its
        bookkeeping done; the caller writes the sample there (:meth:`write`)."""
        slot = self.policy.choose_slot(self, label, generator)
        if slot is not None:
            if not 0 <= slot <= self.filled or slot >= self.size:
                raise IndexError(f"slot {slot} is outside the filled part of a buffer of {self.size}")
            if slot == self.filled:
                self.slot_labels.append(label)
            else:
                self.slot_labels[slot] = label
        self.seen += 1
        return slot

    def write(self, slot: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.inputs is None:
            self.inputs = torch.zeros((self.size, *x.shape), dtype=x.dtype, device=self.device)
        self.inputs[slot] = x
        self.labels[slot] = y

    def sample_slots(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``min(n, filled)`` distinct slots drawn uniformly (int64, on the CPU; empty while empty)."""
        return torch.randperm(self.filled, generator=generator)[: max(0, n)]

    def get(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored ``(inputs, labels)`` at ``slots``."""
        if self.inputs is None:
            raise IndexError("the replay buffer is empty")
        slots = slots.to(self.device)
        return self.inputs[slots], self.labels[slots]

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All valid ``(inputs, labels)``, in slot order."""
        return self.get(torch.arange(self.filled))

    def class_counts(self, num_classes: int) -> list[int]:
        """Stored samples per class, a list of length ``num_classes``."""
        counts = Counter(self.slot_labels)
        return [counts.get(c, 0) for c in range(num_classes)]

    def state_dict(self) -> dict:
        # Copies: the tensors may be views into a population's buffers (saving a view saves them all).
        inputs = None if self.inputs is None else self.inputs.clone()
        return {"inputs": inputs, "labels": self.labels.clone(), "filled": self.filled, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        filled = int(state["filled"])
        if filled > self.size or len(state["labels"]) != self.size:
            raise ValueError(f"buffer state of {len(state['labels'])} slots does not fit {self.size} slots")
        inputs = state["inputs"]
        self.inputs = None if inputs is None else inputs.to(self.device).clone()
        self.labels = state["labels"].to(self.device).clone()
        self.slot_labels = self.labels[:filled].tolist()
        self.seen = int(state["seen"])
