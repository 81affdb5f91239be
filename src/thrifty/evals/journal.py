"""The results journal: one line per finished (model, item), appended and flushed as each call
ends, so a run that dies resumes where it stopped. Its header pins the golden set and the run id
(the run id is in every call's Idempotency-Key, so a call whose answer reached the gateway's
idempotency store but not this journal is answered from the store, not generated again)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import IO, Any

import orjson

from thrifty.errors import InvalidData

JOURNAL_VERSION = 1


class Journal:
    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.run_id = ""
        self._fh: IO[bytes] | None = None
        self._open(fingerprint)

    def _open(self, fingerprint: str) -> None:
        if self.path.exists() and self.path.stat().st_size > 0:
            lines = self.path.read_bytes().split(b"\n")
            try:
                header = orjson.loads(lines[0])
            except orjson.JSONDecodeError as err:
                raise InvalidData(
                    f"{self.path}: not a thrifty eval journal (delete it to start over)"
                ) from err
            if header.get("eval_journal") != JOURNAL_VERSION:
                raise InvalidData(f"{self.path}: not a thrifty eval journal (delete it to start over)")
            if header.get("set") != fingerprint:
                raise InvalidData(
                    f"{self.path}: this journal is of another golden set (fingerprint {header.get('set')}, "
                    f"this set {fingerprint}); give another --out or delete the journal"
                )
            self.run_id = str(header["run_id"])
            for line in lines[1:]:
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    break  # a line cut by the crash: dropped (its call is answered by the idempotency store)
                self.records[(rec["model"], rec["id"])] = rec
            # Rewritten whole (then replaced atomically), so a cut last line never joins the next one.
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in [header, *self.records.values()]))
            os.replace(tmp, self.path)
            self._fh = self.path.open("ab")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.run_id = uuid.uuid4().hex
            self._fh = self.path.open("wb")
            self._write({"eval_journal": JOURNAL_VERSION, "set": fingerprint, "run_id": self.run_id})

    def _write(self, obj: dict[str, Any]) -> None:
        assert self._fh is not None
        self._fh.write(orjson.dumps(obj) + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def done(self, model: str, item_id: str) -> bool:
        return (model, item_id) in self.records

    def add(self, record: dict[str, Any]) -> None:
        self.records[(record["model"], record["id"])] = record
        self._write(record)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
