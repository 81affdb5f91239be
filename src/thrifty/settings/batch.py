"""Batch offload: deferred requests and the provider batches they are sent in."""

from __future__ import annotations

from pydantic import Field, model_validator

from thrifty.settings._base import _Strict

_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> float:
    """'24h', '30m', '2d', '90s' -> seconds; raises ValueError naming the accepted forms."""
    text = text.strip().lower()
    if len(text) >= 2 and text[-1] in _WINDOW_UNITS and text[:-1].isdigit() and int(text[:-1]) > 0:
        return float(int(text[:-1]) * _WINDOW_UNITS[text[-1]])
    raise ValueError(f"{text!r} is not a time window; give a number and a unit: 90s, 30m, 24h, 2d")


class DeferSettings(_Strict):
    """Latency-tolerant work: answered later, through the providers' batch APIs at batch prices."""

    after: str = "24h"  # the longest the caller is willing to wait (the providers' window is 24h)
    max_batch: int = Field(default=1000, ge=1)  # flush the queue into a provider batch at this many
    max_age_s: float = Field(default=300.0, ge=0)  # ... or when its oldest request waited this long
    webhook_url: str | None = None  # POSTed the job with its answer when it is done

    @model_validator(mode="after")
    def _window(self) -> DeferSettings:
        if self.max_age_s >= parse_window(self.after):
            raise ValueError(
                f"max_age_s ({self.max_age_s:g}) must be shorter than the window after ({self.after})"
            )
        return self


class BatchSettings(_Strict):
    poll_interval_s: float = Field(default=30.0, gt=0)  # how often submitted provider batches are polled
    max_lines: int = Field(default=50_000, ge=1)  # per input file (OpenAI's limit)
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)  # per input file (OpenAI's limit)
    # Where uploaded input files are kept; default: a folder beside the SQLite file.
    files_dir: str | None = None
    defer: DeferSettings = Field(default_factory=DeferSettings)  # for requests with x-thrifty-defer
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # How long a runner's claim on a piece of work (validating a job, a provider batch, a webhook)
    # lasts without renewal: after a crash, another process (or the restarted one) takes it over then.
    lease_s: float = Field(default=30.0, gt=0)
