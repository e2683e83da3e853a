"""What lives on the model between calls (hot start): the matrix, the tree chooser, counters."""

from __future__ import annotations

from dataclasses import dataclass, field


from .adjacency import Adjacency

@dataclass
class RecyclingStats:
    """Counters over every generate call since the state was created (or `reset_stats`)."""

    steps: int = 0
    tree_steps: int = 0  # steps that verified a drafted tree (the others were plain one-token steps)
    drafted: int = 0
    accepted: int = 0  # drafted tokens accepted
    emitted: int = 0  # tokens produced (accepted + bonus)
    sizes: dict = field(default_factory=dict)  # tree size -> steps

    def summary(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "sizes"}
        out["sizes"] = dict(sorted(self.sizes.items()))
        out["mean_accepted_per_step"] = self.emitted / self.steps if self.steps else 0.0
        out["acceptance_rate"] = self.accepted / self.drafted if self.drafted else 0.0
        return out


class TreeChooser:
    """Picks the tree size of each step among nested sub-trees: argmax of (accepted + 1) / time.

    `accepted[m]`: running mean of drafted tokens accepted with the m-node sub-tree. One verify of
    the M-node tree tells how many every sub-tree m <= M would have accepted, so all of them are
    updated at once. `seconds[m]`: running mean of a step's wall time (seeded by `calibrate`).
    Sizes above the current choice go stale (but never below a sub-tree's estimate); every
    `probe_every` steps the cheapest larger size runs (4x as rarely while plain steps are best, so
    a prompt nothing can be drafted for pays ~2%), so a matrix that warms up is noticed.
    """

    def __init__(self, sizes, seconds: dict[int, float], probe_every: int = 8, decay: float = 0.3):
        self.sizes = sorted(sizes)
        self.seconds = dict(seconds)
        self.accepted = {m: (1.0 if m else 0.0) for m in self.sizes}  # optimistic until measured
        self.probe_every, self.decay = probe_every, decay
        self.steps = 0
        self.probes = 0  # steps that ran a size above the best (for tests and stats)

    def best(self) -> int:
        return max(self.sizes, key=lambda m: (1.0 + self.accepted[m]) / self.seconds[m])

    def pick(self) -> int:
        self.steps += 1
        best = self.best()
        larger = self.sizes[self.sizes.index(best) + 1:]
        every = self.probe_every if best else 4 * self.probe_every
        if self.steps % every == 0 and larger:
            self.probes += 1
            return min(reversed(larger), key=lambda m: self.seconds[m])
        return best

    def observe(self, size: int, accepted_by_size: dict[int, int], seconds: float) -> None:
        a = self.decay
        before = self.accepted[size]
        for m, acc in accepted_by_size.items():
            self.accepted[m] += a * (acc - self.accepted[m])
        for m in self.sizes:
            if m > size:  # unmeasured: at least the sub-tree's estimate, and the margin above it shrinks
                margin = max(self.accepted[m] - before, 0.0)
                self.accepted[m] = self.accepted[size] + (1 - a) * margin
        self.seconds[size] += a * (seconds - self.seconds[size])

    def new_sequence(self) -> None:
        """A new prompt: keep timings, cap acceptance estimates from the last one at 0.6 tokens
        (another kind of text may accept nothing; a step or two re-measures it)."""
        for m in self.sizes:
            self.accepted[m] = min(self.accepted[m], 0.6)


@dataclass
class RecyclingState:
    """What persists on a model between generate calls: the matrix (hot start), the tree chooser
    and counters. `tokaccel.recycling.recycling_state(model)` returns it; `reset(model)` drops it."""

    adjacency: Adjacency
    chooser: TreeChooser | None = None
    stats: RecyclingStats = field(default_factory=RecyclingStats)


_STATE_ATTR = "_tokaccel_recycling"


def recycling_state(model) -> RecyclingState | None:
    return model.__dict__.get(_STATE_ATTR)


def set_recycling_state(model, state: RecyclingState | None) -> None:
    """Give the model this hot-start state (None: start cold), e.g. to keep one per variant."""
    if state is None:
        model.__dict__.pop(_STATE_ATTR, None)
    else:
        model.__dict__[_STATE_ATTR] = state


def reset(model) -> None:
    """Forget the model's adjacency matrix, tree timings and counters (the next call starts cold)."""
    model.__dict__.pop(_STATE_ATTR, None)
