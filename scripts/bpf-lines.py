#!/usr/bin/env python3
"""Line-level profile of a loaded BPF program (used by scripts/profile.sh).

usage: bpf-lines.py info <prog_name> <out.json>
           while the program is loaded: its JIT image's address ranges and
           line info (jited_line_info + line_info + the BTF's strings),
           read with the bpf() syscall (no libbfd needed)
       bpf-lines.py map <out.json> <perf-script.txt>
           (`perf script -F ip,sym` of a `perf record -g`): samples in the
           program by source line; samples in kernel functions it called,
           by the line that called them
"""
import ctypes, json, os, struct, sys, collections

libc = ctypes.CDLL(None, use_errno=True)
NR_BPF = 321


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    r = libc.syscall(NR_BPF, cmd, buf, len(attr))
    if r < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r, buf.raw


def prog_ids():
    i = 0
    while True:
        attr = struct.pack("IIII", i, 0, 0, 0)
        try:
            _, raw = bpf(11, attr)  # BPF_PROG_GET_NEXT_ID
        except OSError:
            return
        i = struct.unpack_from("I", raw, 4)[0]
        yield i


def fd_of(pid):
    r, _ = bpf(13, struct.pack("IIII", pid, 0, 0, 0))
    return r


INFO_LEN = 232


def info(fd, buf=None):
    b = buf or ctypes.create_string_buffer(INFO_LEN)
    attr = struct.pack("IIQ", fd, INFO_LEN, ctypes.addressof(b))
    bpf(15, attr)
    return b


def do_info(name, out):
    for pid in prog_ids():
        fd = fd_of(pid)
        b = info(fd)
        pname = b.raw[64:80].split(b"\0")[0].decode()
        if pname != name[:15]:
            os.close(fd)
            continue
        nks, nfl = struct.unpack_from("II", b.raw, 104)
        btf_id = struct.unpack_from("I", b.raw, 128)[0]
        nli = struct.unpack_from("I", b.raw, 148)[0]
        njli = struct.unpack_from("I", b.raw, 168)[0]
        lirs, jlirs = struct.unpack_from("II", b.raw, 172)
        ks = ctypes.create_string_buffer(8 * nks)
        fl = ctypes.create_string_buffer(4 * nfl)
        li = ctypes.create_string_buffer(lirs * nli)
        jli = ctypes.create_string_buffer(jlirs * njli)
        b2 = ctypes.create_string_buffer(INFO_LEN)
        raw = bytearray(INFO_LEN)
        struct.pack_into("II", raw, 104, nks, nfl)
        struct.pack_into("QQ", raw, 112, ctypes.addressof(ks), ctypes.addressof(fl))
        struct.pack_into("I", raw, 148, nli)
        struct.pack_into("QQ", raw, 152, ctypes.addressof(li), ctypes.addressof(jli))
        struct.pack_into("III", raw, 168, njli, lirs, jlirs)
        ctypes.memmove(b2, bytes(raw), INFO_LEN)
        info(fd, b2)
        ksyms = struct.unpack(f"{nks}Q", ks.raw)
        flens = struct.unpack(f"{nfl}I", fl.raw)
        lis = [struct.unpack_from("IIII", li.raw, i * lirs) for i in range(nli)]
        jlis = struct.unpack(f"{njli}Q", jli.raw)
        # BTF strings
        bfd, _ = bpf(19, struct.pack("IIII", btf_id, 0, 0, 0))
        bi = ctypes.create_string_buffer(32)
        bpf(15, struct.pack("IIQ", bfd, 32, ctypes.addressof(bi)))
        size = struct.unpack_from("I", bi.raw, 8)[0]
        bb = ctypes.create_string_buffer(size)
        raw = bytearray(32)
        struct.pack_into("QI", raw, 0, ctypes.addressof(bb), size)
        ctypes.memmove(bi, bytes(raw), 32)
        bpf(15, struct.pack("IIQ", bfd, 32, ctypes.addressof(bi)))
        hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("IIIII", bb.raw, 4)
        strs = bb.raw[hdr_len + str_off: hdr_len + str_off + str_len]

        def s(off):
            return strs[off: strs.index(b"\0", off)].decode(errors="replace")

        lines = []
        for (insn, fno, lno, lc), addr in zip(lis, jlis):
            lines.append([addr, os.path.basename(s(fno)), lc >> 10, s(lno).strip()[:90]])
        json.dump({"ksyms": ksyms, "flens": flens, "lines": lines}, open(out, "w"))
        print(f"{name}: id {pid}, {nks} funcs, {len(lines)} line entries")
        return
    sys.exit(f"{name} not loaded")


def do_map(infof, script):
    d = json.load(open(infof))
    ranges = [(a, a + l) for a, l in zip(d["ksyms"], d["flens"])]
    lines = sorted(d["lines"])
    addrs = [l[0] for l in lines]
    import bisect

    def inside(ip):
        return any(a <= ip < b for a, b in ranges)

    own = collections.Counter()
    callee = collections.Counter()
    leafsym = collections.Counter()
    tot = 0
    for s in open(script).read().split("\n\n"):
        fr = [l.split(None, 1) for l in s.strip().split("\n") if l.strip()]
        for i, f in enumerate(fr):
            try:
                ip = int(f[0], 16)
            except ValueError:
                continue
            if inside(ip):
                tot += 1
                j = bisect.bisect_right(addrs, ip if i == 0 else ip - 1) - 1
                l = lines[j]
                key = f"{l[1]}:{l[2]} {l[3]}"
                if i == 0:
                    own[key] += 1
                    leafsym["(own code)"] += 1
                else:
                    jj = j
                    skip = ("helpers.rs", "lib.rs", "hash_map.rs", "lru_hash_map.rs", "per_cpu_array.rs", "array.rs", "non_null.rs", "option.rs", "mod.rs", "maps.rs", "ptr")
                    while jj > 0 and (lines[jj][1] in skip):
                        jj -= 1
                    l2 = lines[jj]
                    key = f"{l2[1]}:{l2[2]} {l2[3]}"
                    callee[(key, fr[0][1] if len(fr[0]) > 1 else "?")] += 1
                    leafsym[fr[0][1] if len(fr[0]) > 1 else "?"] += 1
                break
    print(f"samples in program: {tot}")
    print("-- by leaf --")
    for k, v in leafsym.most_common(15):
        print(f"{100*v/tot:5.1f}% {k}")
    print("-- own code by line --")
    for k, v in own.most_common(45):
        print(f"{100*v/tot:5.1f}% {k}")
    print("-- calls by calling line --")
    byline = collections.Counter()
    for (k, sym), v in callee.items():
        byline[k] += v
    for k, v in byline.most_common(20):
        syms = ", ".join(f"{s2} {100*c/tot:.1f}" for (k2, s2), c in callee.most_common() if k2 == k)[:150]
        print(f"{100*v/tot:5.1f}% {k}\n        {syms}")


if __name__ == "__main__":
    if sys.argv[1] == "info":
        do_info(sys.argv[2], sys.argv[3])
    else:
        do_map(sys.argv[2], sys.argv[3])
