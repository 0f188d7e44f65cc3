"""Experience Replay for a population: each member keeps the buffer and generator of its run alone.

The members' own :class:`~competitors.er.ERReservoir` / ``ERRandom`` objects (built by
:func:`memhead.runner.build_learner` for each member) hold the buffers; this class only drives them
together. Every member draws its replay slots and its storage choices from its own generator, in the
order its run alone draws them: slots after the stream batch's backward, storage after the step.
"""

from __future__ import annotations

import torch

from competitors.er import ERReservoir


class MemberReplay:
    """The replay of every member at once (``None`` from :meth:`of` when the members do not replay)."""

    def __init__(self, competitors: list[ERReservoir]) -> None:
        self.competitors = competitors
        self.batch_size = competitors[0].cfg.buffer_batch_size

    @classmethod
    def of(cls, competitors: list) -> MemberReplay | None:
        if not isinstance(competitors[0], ERReservoir):
            return None
        return cls(competitors)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each member's replay batch, stacked: ``(P, r, ...)`` inputs and ``(P, r)`` labels (or ``None``).

        Every member's buffer has seen the same samples, so all hold the same number of valid slots and
        draw batches of the same size ``r``.
        """
        batches = []
        for competitor in self.competitors:
            slots = competitor.buffer.sample_slots(self.batch_size, competitor.generator)
            if len(slots) == 0:
                return None
            batches.append(competitor.buffer.get(slots))
            competitor.replayed += len(slots)
        return torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches])

    def store(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer the step's samples to every member's buffer (after the step, as the run alone does)."""
        for competitor in self.competitors:
            competitor.after_step(x, y)
