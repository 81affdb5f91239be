"""Recordings of routes with `record`: the public reader API.

    from thrifty.recording import read_recordings
    for rec in read_recordings(settings, "acme", route="support"):
        rec.request["messages"], rec.response, rec.feature, rec.prompt_version ...

`Recording.traffic_line()` gives the line of the traffic format that `thrifty simulate` reads.
"""

from thrifty.stores.recordings import Recording, read_recordings

__all__ = ["Recording", "read_recordings"]
