"""Per-section token budgets of a route's prompts and what happens over them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from thrifty.settings._base import _Strict


class SectionBudget(_Strict):
    """A token budget for one section of a prompt and what happens when a request is over it."""

    budget: int = Field(gt=0)
    # reject: 400 naming the section; trim: shorten it (history: drop the oldest turns; retrieved:
    # pack the best evidence; tools: shorten tool results structurally; output: clamp max_tokens);
    # compact (history only): summarise older turns; warn (system/developer only): pass, noted.
    over: Literal["reject", "trim", "compact", "warn"] | None = None


class HistoryBudget(SectionBudget):
    summary_route: str | None = None  # compact: the (cheap) route whose model writes the summaries
    summary_tokens: int = Field(default=300, gt=0)  # compact: the summary's max_tokens
    # compact: the share of the room beside the summary a new summary leaves to verbatim turns; the
    # rest is headroom for the turns to come. Lower: fewer summary calls, fewer turns kept verbatim.
    verbatim_share: float = Field(default=0.5, gt=0, le=1)
    # compact: a new summary also leaves headroom for this many turns of the chat's average size, so
    # a chat is summarised at most about once every so many turns (fewer verbatim turns if needed).
    turns_per_summary: int = Field(default=4, ge=1, le=100)


class OutputBudget(SectionBudget):
    # Ask the model to plan a short answer instead of being cut off at max_tokens: true for the
    # built-in sentence, or your own text ("{budget}" is replaced by the budget).
    brevity: bool | str = False


class ContextSettings(_Strict):
    """Per-section token budgets of a route (see context/). Sections left out are not limited."""

    system: SectionBudget | None = None
    developer: SectionBudget | None = None
    history: HistoryBudget | None = None
    retrieved: SectionBudget | None = None
    tools: SectionBudget | None = None
    output: OutputBudget | None = None

    @model_validator(mode="after")
    def _policies(self) -> ContextSettings:
        allowed = {
            "system": ("reject", "warn"),
            "developer": ("reject", "warn"),
            "history": ("reject", "trim", "compact"),
            "retrieved": ("reject", "trim"),
            "tools": ("reject", "trim"),
            "output": ("reject", "trim"),
        }
        for name, choices in allowed.items():
            section = getattr(self, name)
            if section is not None and section.over is not None and section.over not in choices:
                why = " (thrifty never rewrites a system prompt)" if name in ("system", "developer") else ""
                raise ValueError(f"{name}.over must be one of {', '.join(choices)}{why}")
        history = self.history
        if history is not None and history.over == "compact" and not history.summary_route:
            raise ValueError("history.over: compact needs history.summary_route (a cheap route)")
        if history is not None and history.over == "compact" and history.summary_tokens >= history.budget:
            raise ValueError("history.summary_tokens must be smaller than history.budget")
        return self

    def policy(self, section: str) -> str:
        """The section's over-budget policy, with the defaults filled in."""
        budget: SectionBudget | None = getattr(self, section)
        if budget is None:
            return "none"
        if budget.over is not None:
            return budget.over
        return "reject" if section in ("system", "developer") else "trim"
