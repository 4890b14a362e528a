"""Read the records of an offline W&B run file (run-<id>.wandb) so tests can check what was
logged. The file is a LevelDB-style log (32 KiB blocks of checksum/length/type-framed chunks) of
wandb_internal_pb2.Record protobufs, after a 7-byte ':W&B' header."""
from __future__ import annotations

import json
import struct
from pathlib import Path


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 mid, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def run_file(run_dir: Path) -> Path:
    files = list(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def config(run_dir: Path) -> dict:
    out = {}
    for r in read_records(run_file(run_dir)):
        if r.WhichOneof("record_type") == "config":
            out.update({i.key: json.loads(i.value_json) for i in r.config.update})
    return out


def history(run_dir: Path) -> list[dict]:
    """One dict per logged step; media such as histograms come back as nested dicts
    ({"_type": "histogram", "values": [...], "bins": [...]})."""
    rows = []
    for r in read_records(run_file(run_dir)):
        if r.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in r.history.item:
            path = [item.key] if item.key else list(item.nested_key)
            node = row
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows
