"""Zero, in place, the payloads of fatbin entries a given GPU arch never loads (sizes and headers kept,
so the ELF is unchanged in layout; zeros compress to nothing). Per fatbin container: keep ELF entries of
arch major == 9 (sm_90/sm_90a); if the container has none, keep its highest PTX <= 90 (JIT); zero the rest
(a container with neither holds nothing an sm_90 device can load).
Kind 8 entries (LTO-IR, read by nvJitLink, never by the driver) are zeroed too.
Used on the cuda lock's CUDA 12 libraries carried to an H200 (BENCHMARKS.md, 2026-12-02); not part of the build.
usage: python3 bench/fatbin_keep.py [--dry] FILE..."""
import mmap, struct, sys

MAGIC = struct.pack("<IHH", 0xBA55ED50, 1, 16)


def entries(m, start, end):
    off = start
    while off + 64 <= end:
        kind, _, hsize, size = struct.unpack_from("<HHIQ", m, off)
        arch = struct.unpack_from("<I", m, off + 28)[0]
        if kind not in (1, 2, 8, 16) or hsize < 64 or off + hsize + size > end:
            return None
        yield off, kind, hsize, size, arch
        off += hsize + size


def prune(path, dry=False):
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        pos, total, zeroed, nfat, bad = 0, 0, 0, 0, 0
        while True:
            pos = m.find(MAGIC, pos)
            if pos < 0:
                break
            fsize = struct.unpack_from("<Q", m, pos + 8)[0]
            start, end = pos + 16, pos + 16 + fsize
            if end > len(m):  # a false magic
                pos += 4
                bad += 1
                continue
            ents = list(entries(m, start, end))
            nfat += 1
            sass9 = [e for e in ents if e[1] == 2 and e[4] // 10 == 9]
            keep = set(id(e) for e in sass9)
            if not sass9:
                ptx = [e for e in ents if e[1] == 1 and e[4] <= 90]
                if ptx:
                    best = max(e[4] for e in ptx)
                    keep |= {id(e) for e in ptx if e[4] == best}
                # else: nothing an sm_90 device can load (other archs' SASS, newer PTX): zero it all
            for e in ents:
                total += e[3]
                if id(e) not in keep:
                    zeroed += e[3]
                    if not dry:
                        m[e[0] + e[2]:e[0] + e[2] + e[3]] = bytes(e[3])
            pos = end
        m.flush()
        print(f"{path}: {nfat} fatbins, {total/1e6:.1f} MB of entries, {zeroed/1e6:.1f} MB zeroed, {bad} false magics")


if __name__ == "__main__":
    dry = "--dry" in sys.argv
    for p in sys.argv[1:]:
        if p != "--dry":
            prune(p, dry)
