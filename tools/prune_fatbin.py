"""Cut every fatbin of a shared library down to one GPU architecture's cubins, in place.

Used to carry onnxruntime-gpu to the device machine within its 64 MiB-per-call transfer limit: the
CUDA provider library holds cubins for sm_75/80/86/89/90/120, and a Hopper card loads only sm_90.
Each fatbin in the .nv_fatbin section keeps its place (its wrapper in .nvFatBinSegment points at it);
its kept entries move to the front, its header's size shrinks to them, and the freed bytes are
zeroed, so the file compresses. A fatbin with no entry for the architecture is left whole.
Check the result with `cuobjdump --list-elf LIB`.

    python tools/prune_fatbin.py site/onnxruntime/capi/libonnxruntime_providers_cuda.so --sm 90
"""

from __future__ import annotations

import argparse
import collections
import struct
import subprocess
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50


def section(path: Path, name: str) -> tuple[int, int]:
    """(file offset, size) of an ELF section, from readelf."""
    out = subprocess.run(["readelf", "-S", "--wide", str(path)], capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if f" {name} " in l)
    fields = line.split("]", 1)[1].split()
    return int(fields[3], 16), int(fields[4], 16)


def prune(path: Path, sm: int) -> dict:
    data = bytearray(path.read_bytes())
    offset, size = section(path, ".nv_fatbin")
    pos, end = offset, offset + size
    dropped: collections.Counter = collections.Counter()
    fatbins = whole = kept = 0
    while pos < end:
        magic, _version, header, body = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:  # alignment padding between fatbins
            pos += 8
            continue
        fatbins += 1
        start, stop = pos + header, pos + header + body
        entries, e = [], start
        while e < stop:
            _kind, _ver, entry_header, payload = struct.unpack_from("<HHIQ", data, e)
            arch = struct.unpack_from("<I", data, e + 28)[0]
            entries.append((e, entry_header + payload, arch))
            e += entry_header + payload
        keep = [x for x in entries if x[2] == sm]
        if keep:
            blob = b"".join(bytes(data[s:s + n]) for s, n, _ in keep)
            data[start:stop] = blob + bytes(stop - start - len(blob))
            struct.pack_into("<Q", data, pos + 8, len(blob))
            kept += len(blob)
            for _, n, arch in entries:
                if arch != sm:
                    dropped[f"sm_{arch}"] += n
        else:
            whole += 1
        pos = stop
    path.write_bytes(bytes(data))
    return {"fatbins": fatbins, "left_whole": whole, "kept_bytes": kept, "dropped_bytes": dict(dropped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("library", type=Path)
    parser.add_argument("--sm", type=int, default=90, help="architecture to keep (90: Hopper, H100/H200)")
    args = parser.parse_args()
    print(prune(args.library, args.sm))


if __name__ == "__main__":
    main()
