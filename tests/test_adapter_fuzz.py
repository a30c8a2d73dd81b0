"""A seeded mutation fuzz of the adapter reader: every damaged file is either accepted or refused with the
project's own AdapterFileError, never another exception (which a host would show as a traceback)."""
import json
import random
import struct
from collections import Counter

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from unlearn_core.adapter_io import AdapterFileError, base_fingerprint, inspect, read_adapter, write_adapter
from unlearn_core.lora import Deltas
from unlearn_core.targets import Target

FILES = 300
SEED = 15
DTYPES = ["F8_E4M3", "F8_E5M2", "I32", "I64", "BOOL", "U8", "F64", "BF16", "F16", "F32", "XX"]
ODD_JSON = ["[null]", "null", "{}", '{"probe": [null]}', '{"probe": ["1"]}', '{"probe": [1e400]}', '{"probe": [1e30]}',
            '{"width": true}', '{"probe": [' + "9" * 400 + "]}", "[" * 50000 + "]" * 50000, '{"a": ' * 3000 + "1" + "}" * 3000,
            '"text"', "NaN", "{not json", ""]
ODD_KEY_PARTS = ["layers_00_", "layers_\u0663_", "layers_-1_", "layers_999_", "layers_1_2_", "LAYERS_1_", "layers__"]


def split(data: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def metadata_of(header: dict) -> dict:
    if not isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = {}
    return header["__metadata__"]


def mutate_header(rng: random.Random, header: dict) -> None:
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        return
    key = rng.choice(keys)
    entry = header[key]
    action = rng.randrange(9)
    if action == 0:
        entry["dtype"] = rng.choice(DTYPES)
    elif action == 1:
        entry["shape"] = [rng.choice([0, 1, 2, 3, 32, 128, 2 ** 31]) for _ in range(rng.randrange(4))]
    elif action == 2:
        start, end = entry["data_offsets"]
        entry["data_offsets"] = [start + rng.randint(-8, 8), end + rng.randint(-8, 8)]
    elif action == 3:
        header[key.replace("layers_", rng.choice(ODD_KEY_PARTS), 1)] = header.pop(key)
    elif action == 4:
        header[key.replace(".lora_", rng.choice([".lora_mid.", ".", ".diff.", "_lora_"]), 1)] = header.pop(key)
    elif action == 5:
        del header[key]
    elif action == 6:
        metadata_of(header)["concept_unlearn.base_fingerprint"] = rng.choice(ODD_JSON)
    elif action == 7:
        name = rng.choice(["concept_unlearn.steps", "concept_unlearn.notes", "ss_v2", "ss_base_model_version"])
        metadata_of(header)[name] = rng.choice(ODD_JSON + ["False", "sd_v1", "sdxl_base_v1-0"])
    else:
        header["__metadata__"] = rng.choice([None, [], "x", {"a": 1}])


RETYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float32, torch.float64, torch.int32,
           torch.uint8, torch.bool]


def mutate_tensors(rng: random.Random, tensors: dict, metadata: dict) -> bytes:
    """Well-formed safetensors with wrong content: other dtypes (float8 included), NaN/inf/huge values, other
    shapes, renamed or missing keys, odd metadata."""
    tensors, metadata = dict(tensors), dict(metadata)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(sorted(tensors)) if tensors else None
        action = rng.randrange(6)
        if key is None or action == 5:
            name = rng.choice(["concept_unlearn.base_fingerprint", "concept_unlearn.steps", "ss_v2"])
            metadata[name] = rng.choice(ODD_JSON)
        elif action == 0:
            tensors[key] = tensors[key].to(rng.choice(RETYPES))
        elif action == 1:
            changed = tensors[key].float().clone()
            changed.view(-1)[rng.randrange(changed.numel())] = rng.choice([float("nan"), float("inf"), 1e6, -1e30])
            tensors[key] = changed.to(tensors[key].dtype) if tensors[key].is_floating_point() else changed
        elif action == 2:
            tensors[key] = torch.zeros([rng.choice([0, 1, 2, 3, 32, 128]) for _ in range(rng.randrange(4))])
        elif action == 3:
            tensors[key.replace("layers_", rng.choice(ODD_KEY_PARTS), 1)] = tensors.pop(key)
        else:
            del tensors[key]
    return save_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def mutate(rng: random.Random, data: bytes, tensors: dict, metadata: dict) -> bytes:
    kind = rng.randrange(5)
    if kind == 4:
        return mutate_tensors(rng, tensors, metadata)
    if kind == 0:  # flip bytes anywhere
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if kind == 1:  # truncate
        return data[:rng.randrange(len(data))]
    header, body = split(data)
    for _ in range(rng.randint(1, 3)):  # valid safetensors framing, damaged content
        mutate_header(rng, header)
    if kind == 3:  # and damaged numbers: NaN/inf/huge values in the tensor data
        out = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(0, max(1, len(out) - 4))
            out[at:at + 4] = rng.choice([b"\x00\x7e\x00\x7c", b"\xff\xff\xff\xff", b"\x00\x00\x80\x7f"])
        body = bytes(out)
    return join(header, body)


def valid_adapter(backend, folder):
    shapes = {Target(0, "fc1"): (128, 32), Target(0, "fc2"): (32, 128)}
    shapes.update({Target(1, p): (32, 32) for p in ("q", "k", "v", "out")})
    deltas = Deltas(shapes, rank=2, seed=1)
    with torch.no_grad():
        for up in deltas.up.values():
            up.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return write_adapter(folder / "valid.safetensors", deltas, base_fingerprint(backend), {"concept": "x", "steps": 3})


def test_mutated_adapters_give_only_clean_errors(backend, tmp_path):
    valid = valid_adapter(backend, tmp_path)
    original = valid.read_bytes()
    with safe_open(str(valid), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    rng = random.Random(SEED)
    outcomes, foreign = Counter(), []
    path = tmp_path / "mutated.safetensors"
    for i in range(FILES):
        path.write_bytes(mutate(rng, original, tensors, metadata))
        for reader in (lambda: read_adapter(path, backend), lambda: json.dumps(inspect(path))):
            try:
                reader()
                outcomes["accepted"] += 1
            except AdapterFileError:
                outcomes["clean error"] += 1
            except Exception as error:  # noqa: BLE001 - what the fuzz looks for
                outcomes["foreign"] += 1
                foreign.append(f"file {i}: {error.__class__.__name__}: {str(error)[:120]}")
    print(f"\nadapter fuzz, {FILES} files x (read_adapter, inspect): {dict(outcomes)}")
    assert foreign == []
    assert outcomes["clean error"] > FILES // 2 and outcomes["accepted"] > 0  # both paths were exercised
