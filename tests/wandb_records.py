"""Read the records of an offline W&B run file (run-<id>.wandb) so tests can check what was
logged. The file is a LevelDB-style log (32 KiB blocks of checksum/length/type-framed chunks) of
wandb_internal_pb2.Record protobufs, after a 7-byte ':W&B' header."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path


def read_records(path: Path, wait_s: float = 30.0) -> list:
    """The file's records once it is whole: run.finish() can return before W&B's writer process
    has flushed the last blocks (seen on a loaded machine: no history yet, or a record cut off),
    so read again until the run's exit record, written last, is there."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            records = parse_records(Path(path).read_bytes(), path)
        except DecodeError:
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {wait_s:.0f} s: the run did "
                                 "not finish")
        time.sleep(0.2)


def parse_records(data: bytes, path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

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
