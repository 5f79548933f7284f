"""What an offline W&B run recorded, read back from its ``.wandb`` file (the tests' view of a run).

W&B has no public reader of its offline transaction log; this one reads its framing (LevelDB's log format) and
parses each record with W&B's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def _log_records(path: Path):
    """Raw records of a W&B transaction log (LevelDB log format: 32 KiB blocks, 7-byte headers)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # padding to the block end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def _set_nested(d: dict, item) -> None:
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = json.loads(item.value_json)


def read_offline_run(run_dir) -> dict:
    """What an offline run recorded: {id, name, group, project, config, history, summary}.

    history: one dict per logged step, in order, with `_step`; summary: the final
    summary (W&B's own `_`-keys included).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"no .wandb file in {run_dir}")
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}}
    for raw in _log_records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(id=r.run_id, name=r.display_name, group=r.run_group, project=r.project)
            for item in r.config.update:
                _set_nested(out["config"], item)
        elif kind == "config":
            for item in rec.config.update:
                _set_nested(out["config"], item)
        elif kind == "history":
            row: dict = {}
            for item in rec.history.item:
                _set_nested(row, item)
            out["history"].append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _set_nested(out["summary"], item)
            for item in rec.summary.remove:
                out["summary"].pop(item.key, None)
    out["config"].pop("_wandb", None)
    return out
