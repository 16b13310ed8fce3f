"""Guardrails (governance.md): checked on the frozen plan, after the freeze and before
anything is sent. A verdict gives the numbers and the limit it broke, so the run's error
message says what happened and what to do.

``held`` is the number of members the destination holds as far as audsync knows (the
snapshot's rows); ``audience`` the members of S.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Guardrails


@dataclass(frozen=True)
class Verdict:
    """The outcome of the guardrail check of one plan."""

    adds: int
    removes: int
    updates: int
    held: int
    audience: int
    limits: Guardrails
    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def blocked(self) -> bool:
        return bool(self.reasons)

    @property
    def changes(self) -> int:
        return self.adds + self.removes + self.updates

    def message(self, sync: str) -> str:
        """The run's error message when blocked: the numbers, the limit, what to do."""
        if not self.blocked:
            return f"sync {sync!r}: within its guardrails"
        return (
            f"blocked by a guardrail: {'; '.join(self.reasons)}. Nothing was sent. Fix the model, "
            f"or raise the limit in the sync's config, or run once with `audsync run {sync} --force`."
        )

    def summary(self) -> str:
        """One line: pass or blocked, with the numbers (for plans and alerts)."""
        numbers = (f"{self.removes} removals, {self.changes} changes, {self.held} held, "
                   f"{self.audience} in the audience")
        return ("blocked: " + "; ".join(self.reasons)) if self.blocked else f"pass ({numbers})"


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def evaluate(adds: int, removes: int, updates: int, held: int, audience: int, limits: Guardrails) -> Verdict:
    """Check a plan's counts against ``limits``; the verdict lists every limit broken."""
    reasons: list[str] = []
    changes = adds + removes + updates
    if not limits.allow_empty and audience == 0 and held > 0 and removes > 0:
        reasons.append(
            f"the audience is empty and the run would remove {removes} of the {held} members the "
            f"destination holds (allow_empty is false)"
        )
    if (limits.max_removals_pct is not None and held > 0 and removes > limits.guard_min_rows
            and _pct(removes, held) > limits.max_removals_pct):
        reasons.append(
            f"the run would remove {removes} of the {held} members the destination holds "
            f"({_pct(removes, held):.1f}%), above max_removals_pct {limits.max_removals_pct:g}% "
            f"(checked above guard_min_rows {limits.guard_min_rows})"
        )
    if limits.max_removals is not None and removes > limits.max_removals:
        reasons.append(f"the run would remove {removes} members, above max_removals {limits.max_removals}")
    if (limits.max_changes_pct is not None and held > 0 and changes > limits.guard_min_rows
            and _pct(changes, held) > limits.max_changes_pct):
        reasons.append(
            f"the run would change {changes} members against the {held} the destination holds "
            f"({_pct(changes, held):.1f}%), above max_changes_pct {limits.max_changes_pct:g}% "
            f"(checked above guard_min_rows {limits.guard_min_rows})"
        )
    return Verdict(adds, removes, updates, held, audience, limits, tuple(reasons))
