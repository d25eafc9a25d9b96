//! CRC32c (Castagnoli), as SCTP uses it (RFC 9260 appendix A), full and
//! incremental.
//!
//! # Values and byte order
//!
//! Every `u32` called a *checksum* or *crc* here is the standard CRC32c
//! value (reflected polynomial `0x82F63B78`, initial register `!0`, final
//! complement): `crc32c(b"123456789") == 0xE306_9283`.
//!
//! SCTP computes it over the whole SCTP packet (common header and chunks,
//! no pseudo-header) with the 4-byte checksum field (offset 8..12) set to
//! zero, and stores it **least significant byte first**: the field's bytes
//! are `crc.to_le_bytes()` (what Linux's `cpu_to_le32` and usrsctp write).
//! So the value is `u32::from_le_bytes(field)`, which is also what a plain
//! 32-bit load of the field gives on a little-endian machine (x86, `bpfel`).
//! [`to_wire`] / [`from_wire`] say it in code.
//!
//! # Incremental update
//!
//! CRC32c is affine over GF(2): for messages `M` and `D` of the same length
//! `crc(M ^ D) = crc(M) ^ crc(D) ^ crc(0^L)`, and `crc(D) ^ crc(0^L)` is the
//! *linear* part `lin(D)` (register starting at 0, no final complement).
//! When only bytes `o..o+n` of an `L`-byte SCTP packet change, `D` is zero
//! outside them, so
//!
//! ```text
//! new = old ^ lin(diff bytes) * x^(8 * (L - o - n))  mod P
//! ```
//!
//! (leading zero bytes do not change a register that starts at 0; trailing
//! zero bytes multiply it by `x^8` each). The correction depends only on the
//! XOR difference, and on how many bytes of the packet follow it
//! (`len_after = L - o - n`), never on the rest of the packet. The
//! checksum field itself must not be inside the changed range.
//!
//! # Cost (what the datapath pays)
//!
//! Both ways below read nothing of the packet but the changed bytes, use
//! no allocation and no stack arrays beyond the caller's `N` bytes, and
//! every loop has a constant bound; both pass the verifier.
//!
//! - [`adjust_fast_u32`] (use this one in the datapath; [`adjust_fast_u32_nb`]
//!   where many updates are chained): 4 table steps for the linear CRC of
//!   the difference, then [`shift_fast`]: per set bit of
//!   `len_after` (at most 16), four lookups in the [`SHIFT`] tables of
//!   multiplication by `x^(8 * 2^k)` and three xors. 64 KiB of read-only
//!   tables (`.rodata`).
//! - [`adjust`]: the same difference, then [`xpow8n`] (two lookups in
//!   256-entry tables of `x^(8j)` and `x^(2048j)`, one [`mulmod`]) and a
//!   second [`mulmod`]; a [`mulmod`] is exactly 32 shift/conditional-xor
//!   steps. 3 KiB of tables (`TABLE`, `XPOW_LO`, `XPOW_HI`).
//!
//! Measured with `BPF_PROG_TEST_RUN` (XDP, the 4 port bytes of a 92- and a
//! 1428-byte SCTP packet rewritten and the checksum updated, output equal to
//! a full recompute): [`adjust_fast_u32`] 25..47 ns over a program that only
//! writes one byte, [`adjust`] 160..230 ns; 131 and 166 translated
//! instructions. The textbook alternative, square-and-multiply over
//! `x^(2^k)` powers (up to 16 [`mulmod`]s), is kept as [`xpow8n_sqmul`] for
//! userspace and to cross-check the tables.
//!
//! Note that only SCTP-covered bytes need this: the IP addresses are not
//! covered (no pseudo-header), so a translation that keeps the ports needs
//! no checksum work at all.

/// The reflected Castagnoli polynomial (0x1EDC6F41 bit-reversed).
pub const POLY: u32 = 0x82F6_3B78;

/// `x^0` (the polynomial 1) in the reflected representation: coefficient
/// of `x^k` is bit `31 - k`.
pub const ONE: u32 = 1 << 31;

const fn make_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

/// Byte-at-a-time table: `TABLE[b]` is the register after feeding byte `b`
/// into a zero register.
pub static TABLE: [u32; 256] = make_table();

/// `a * b mod P`, both in the reflected representation. Exactly 32
/// iterations of shift and conditional xor (branch-free), no table.
#[inline(always)]
pub const fn mulmod(a: u32, b: u32) -> u32 {
    let mut p = 0u32;
    let mut b = b;
    let mut i = 0;
    while i < 32 {
        // coefficient of x^i in `a` (bit 31 - i)
        let bit = (a >> (31 - i)) & 1;
        p ^= b & 0u32.wrapping_sub(bit);
        // b *= x
        b = (b >> 1) ^ (POLY & 0u32.wrapping_sub(b & 1));
        i += 1;
    }
    p
}

/// `a * x^8 mod P` (one table step with a zero byte).
#[inline(always)]
const fn times_x8(a: u32) -> u32 {
    let t = make_table_entry((a & 0xff) as u8);
    t ^ (a >> 8)
}

const fn make_table_entry(b: u8) -> u32 {
    let mut c = b as u32;
    let mut k = 0;
    while k < 8 {
        c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
        k += 1;
    }
    c
}

const fn make_xpow_lo() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut p = ONE;
    let mut j = 0;
    while j < 256 {
        t[j] = p;
        p = times_x8(p);
        j += 1;
    }
    t
}

const fn make_xpow_hi() -> [u32; 256] {
    // x^(8 * 256) = x^2048
    let mut step = ONE;
    let mut k = 0;
    while k < 256 {
        step = times_x8(step);
        k += 1;
    }
    let mut t = [0u32; 256];
    let mut p = ONE;
    let mut j = 0;
    while j < 256 {
        t[j] = p;
        p = mulmod(p, step);
        j += 1;
    }
    t
}

/// `XPOW_LO[j] = x^(8j) mod P`.
pub static XPOW_LO: [u32; 256] = make_xpow_lo();
/// `XPOW_HI[j] = x^(8 * 256 * j) mod P`.
pub static XPOW_HI: [u32; 256] = make_xpow_hi();

/// `x^(8n) mod P`: the operator "append `n` zero bytes" on a register.
/// Two table lookups and one [`mulmod`]; covers every `n` a packet can
/// have (`u16`).
#[inline(always)]
pub fn xpow8n(n: u16) -> u32 {
    let lo = XPOW_LO[(n & 0xff) as usize];
    let hi = XPOW_HI[(n >> 8) as usize];
    mulmod(lo, hi)
}

/// Multiplication tables for the constants `x^(8 * 2^k)`, k = 0..16:
/// `SHIFT[k][i][b] = (b << 8i) * x^(8 * 2^k) mod P`, so multiplying a
/// register by `x^(8 * 2^k)` is four lookups (see [`shift_fast`]). 64 KiB.
pub static SHIFT: [[[u32; 256]; 4]; 16] = make_shift();

const fn make_shift() -> [[[u32; 256]; 4]; 16] {
    let mut t = [[[0u32; 256]; 4]; 16];
    let mut c = times_x8(ONE); // x^8 = x^(8 * 2^0)
    let mut k = 0;
    while k < 16 {
        let mut i = 0;
        while i < 4 {
            // the 8 single-bit entries, then every byte by linearity
            let mut j = 0;
            while j < 8 {
                t[k][i][1 << j] = mulmod(1u32 << (8 * i + j), c);
                j += 1;
            }
            let mut b: usize = 1;
            while b < 256 {
                let low = b & b.wrapping_neg();
                t[k][i][b] = t[k][i][b & (b - 1)] ^ t[k][i][low];
                b += 1;
            }
            i += 1;
        }
        c = mulmod(c, c);
        k += 1;
    }
    t
}

/// `reg * x^(8n) mod P` (append `n` zero bytes to a raw register) with
/// the [`SHIFT`] tables: per set bit of `n`, four table lookups and three
/// xors; a loop of 16 bounded iterations, no [`mulmod`]. About 4x faster
/// than `mulmod(reg, xpow8n(n))` in BPF, for 64 KiB of tables.
#[inline(always)]
pub fn shift_fast(reg: u32, n: u16) -> u32 {
    let mut r = reg;
    let mut k = 0;
    while k < 16 {
        if (n >> k) & 1 != 0 {
            // (The lookups written out here, not through `shift_step`:
            // that shape puts the IPv6 TC program past the verifier's
            // budget.)
            let t = &SHIFT[k];
            r = t[0][(r & 0xff) as usize]
                ^ t[1][((r >> 8) & 0xff) as usize]
                ^ t[2][((r >> 16) & 0xff) as usize]
                ^ t[3][(r >> 24) as usize];
        }
        k += 1;
    }
    r
}

/// `r * x^(8 * 2^k) mod P`: four lookups in the [`SHIFT`] tables of `k`
/// (for [`shift_fast_nb`]).
#[inline(always)]
fn shift_step(k: usize, r: u32) -> u32 {
    let t = &SHIFT[k];
    t[0][(r & 0xff) as usize]
        ^ t[1][((r >> 8) & 0xff) as usize]
        ^ t[2][((r >> 16) & 0xff) as usize]
        ^ t[3][(r >> 24) as usize]
}

/// [`shift_fast`] without a branch on the bits of `n`: every step does its
/// four lookups and keeps or drops the result by mask. Twice the work,
/// but one path: a BPF verifier walking it sees no 2^16 branch outcomes
/// (use it where many updates are chained, e.g. rewriting several
/// addresses of one packet).
#[inline(always)]
pub fn shift_fast_nb(reg: u32, n: u16) -> u32 {
    let mut r = reg;
    let mut k = 0;
    while k < 16 {
        let m = shift_step(k, r);
        let keep = 0u32.wrapping_sub(((n as u32) >> k) & 1);
        r = (m & keep) | (r & !keep);
        k += 1;
    }
    r
}

/// [`adjust_fast_u32`] with [`shift_fast_nb`].
#[inline(always)]
pub fn adjust_fast_u32_nb(crc: u32, diff_ne: u32, len_after: u16) -> u32 {
    crc ^ shift_fast_nb(diff_reg(diff_ne), len_after)
}

/// `x^(2^k) mod P` for k = 0..64 (square-and-multiply powers).
const fn make_x2k() -> [u32; 64] {
    let mut t = [0u32; 64];
    let mut p = ONE >> 1; // x^1
    let mut k = 0;
    while k < 64 {
        t[k] = p;
        p = mulmod(p, p);
        k += 1;
    }
    t
}

static X2K: [u32; 64] = make_x2k();

/// `x^(8n) mod P` by square-and-multiply over the precomputed `x^(2^k)`
/// powers: one [`mulmod`] per set bit of `8n`, at most 61. For userspace
/// and to cross-check [`xpow8n`]; the datapath uses [`xpow8n`].
pub fn xpow8n_sqmul(n: u64) -> u32 {
    let mut p = ONE;
    let mut k = 3; // 8n = n << 3
    let mut n = n;
    while n != 0 && k < 64 {
        if n & 1 != 0 {
            p = mulmod(X2K[k], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

/// Feed `data` into a raw register (no initial value, no complement):
/// the building block of [`crc32c`] and of the linear part.
#[inline(always)]
pub fn update(mut reg: u32, data: &[u8]) -> u32 {
    for &b in data {
        reg = TABLE[((reg ^ b as u32) & 0xff) as usize] ^ (reg >> 8);
    }
    reg
}

/// Standard CRC32c of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    !update(!0, data)
}

/// The checksum of an SCTP packet (`pkt` starts at the SCTP common header
/// and ends with the last chunk): CRC32c with bytes 8..12 taken as zero,
/// whatever they hold. Store it with [`to_wire`]. Userspace only (its
/// loop follows the packet length).
pub fn sctp_checksum(pkt: &[u8]) -> u32 {
    if pkt.len() < 12 {
        return crc32c(pkt);
    }
    let r = update(!0, &pkt[..8]);
    let r = update(r, &[0; 4]);
    !update(r, &pkt[12..])
}

/// True when the packet's checksum field holds its CRC32c.
pub fn sctp_checksum_ok(pkt: &[u8]) -> bool {
    pkt.len() >= 12 && from_wire([pkt[8], pkt[9], pkt[10], pkt[11]]) == sctp_checksum(pkt)
}

/// Recompute and store the checksum of an SCTP packet in place.
pub fn sctp_set_checksum(pkt: &mut [u8]) {
    if pkt.len() >= 12 {
        let c = sctp_checksum(pkt);
        pkt[8..12].copy_from_slice(&to_wire(c));
    }
}

/// The checksum field's bytes for checksum `crc` (least significant first).
#[inline(always)]
pub const fn to_wire(crc: u32) -> [u8; 4] {
    crc.to_le_bytes()
}

/// The checksum held in the field's bytes (see [`to_wire`]).
#[inline(always)]
pub const fn from_wire(field: [u8; 4]) -> u32 {
    u32::from_le_bytes(field)
}

/// New checksum after the `N` bytes `old` of an SCTP packet became `new`,
/// with `len_after` bytes of the packet following them
/// (`len_after = L - offset - N`, `L` = SCTP common header + chunks).
/// `crc` and the result are checksum values ([`from_wire`]).
///
/// Example: the ports (offset 0, `N = 4`) of an `L`-byte packet:
/// `adjust(crc, &old_ports, &new_ports, (L - 4) as u16)`.
#[inline(always)]
pub fn adjust<const N: usize>(crc: u32, old: &[u8; N], new: &[u8; N], len_after: u16) -> u32 {
    let mut reg = 0u32;
    let mut i = 0;
    while i < N {
        let d = old[i] ^ new[i];
        reg = TABLE[((reg ^ d as u32) & 0xff) as usize] ^ (reg >> 8);
        i += 1;
    }
    crc ^ mulmod(reg, xpow8n(len_after))
}

/// [`adjust`] computed with [`shift_fast`] (same result), for a 32-bit
/// field given as the XOR of its old and new value as loaded from memory
/// (`u32::from_ne_bytes` of the bytes): no arrays, so nothing on the
/// caller's stack (the BPF new-flow programs are short of it).
#[inline(always)]
pub fn adjust_fast_u32(crc: u32, diff_ne: u32, len_after: u16) -> u32 {
    crc ^ shift_fast(diff_reg(diff_ne), len_after)
}

/// The raw CRC register of the 4 bytes whose XOR is `diff_ne` (as loaded
/// from memory).
#[inline(always)]
fn diff_reg(diff_ne: u32) -> u32 {
    // Byte `i` in memory order is bits 8i.. of the little-endian value
    // (`to_le` is nothing on a little-endian target, a swap otherwise).
    let d = diff_ne.to_le();
    let mut reg = 0u32;
    let mut i = 0;
    while i < 4 {
        let b = (d >> (8 * i)) & 0xff;
        reg = TABLE[((reg ^ b) & 0xff) as usize] ^ (reg >> 8);
        i += 1;
    }
    reg
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// xorshift64*: deterministic, no dependencies.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn adjust_fast_u32_matches_full_recompute() {
        let mut r = Rng(7);
        for _ in 0..2000 {
            let len = 16 + r.below(1400);
            let mut pkt = r.bytes(len);
            sctp_set_checksum(&mut pkt);
            let old = u32::from_ne_bytes(pkt[0..4].try_into().unwrap());
            let new = r.next() as u32;
            let crc = from_wire(pkt[8..12].try_into().unwrap());
            pkt[0..4].copy_from_slice(&new.to_ne_bytes());
            let inc = adjust_fast_u32(crc, old ^ new, (len - 4) as u16);
            assert_eq!(inc, sctp_checksum(&pkt));
            assert_eq!(adjust_fast_u32_nb(crc, old ^ new, (len - 4) as u16), inc);
        }
    }

    #[test]
    fn crc32c_known_vectors() {
        // RFC 3720 (iSCSI) B.4 and the standard check value.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        let dec: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&dec), 0x113F_DB5C);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn crc32c_rfc3720_iscsi_read_pdu() {
        // RFC 3720 B.4: an iSCSI SCSI Read (10) command PDU; the RFC shows
        // the CRC as the bytes it is stored as (least significant first).
        let pdu: [u8; 48] = [
            0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
            0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, //
            0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18, //
            0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
            0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        ];
        assert_eq!(to_wire(crc32c(&pdu)), [0x56, 0x3a, 0x96, 0xd9]);
    }

    #[test]
    fn sctp_checksum_of_an_init() {
        // A hand-built INIT (ports 32836 -> 7, vtag 0): the checksum is
        // the CRC of the packet with a zero field, stored LSB first.
        let pkt: [u8; 32] = [
            0x80, 0x44, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0, 0, 0, 0, 0x01, 0x00, 0x00, 0x14,
            0x1c, 0x6d, 0x3c, 0x95, 0x00, 0x01, 0xa0, 0x00, 0x00, 0x0a, 0xff, 0xff, 0x5d, 0x3c,
            0x3c, 0x0b,
        ];
        let mut p = pkt;
        sctp_set_checksum(&mut p);
        assert!(sctp_checksum_ok(&p));
        assert_eq!(from_wire([p[8], p[9], p[10], p[11]]), crc32c(&pkt));
        // whatever the field held before does not matter
        let mut q = p;
        q[8..12].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(sctp_checksum(&q), sctp_checksum(&p));
        assert!(!sctp_checksum_ok(&q));
    }

    #[test]
    fn mulmod_is_a_ring() {
        let mut r = Rng(0x1234_5678_9abc_def1);
        for _ in 0..2000 {
            let (a, b, c) = (r.next() as u32, r.next() as u32, r.next() as u32);
            assert_eq!(mulmod(a, ONE), a);
            assert_eq!(mulmod(a, b), mulmod(b, a));
            assert_eq!(mulmod(mulmod(a, b), c), mulmod(a, mulmod(b, c)));
            assert_eq!(mulmod(a, b ^ c), mulmod(a, b) ^ mulmod(a, c));
        }
    }

    #[test]
    fn xpow8n_is_appending_zero_bytes() {
        let mut r = Rng(42);
        for n in (0..3000u16).chain([4095, 4096, 9000, 65_535]) {
            let reg = r.next() as u32;
            let zeros = std::vec![0u8; n as usize];
            let want = update(reg, &zeros);
            assert_eq!(mulmod(reg, xpow8n(n)), want, "n={n}");
            assert_eq!(xpow8n(n), xpow8n_sqmul(n as u64), "n={n}");
            assert_eq!(shift_fast(reg, n), want, "n={n}");
        }
        assert_eq!(xpow8n(0), ONE);
    }

    #[test]
    fn incremental_equals_full_recompute() {
        let mut r = Rng(0xdead_beef_cafe_f00d);
        for case in 0..20_000 {
            let len = 12 + r.below(1500);
            let mut pkt = r.bytes(len);
            sctp_set_checksum(&mut pkt);
            let old = from_wire([pkt[8], pkt[9], pkt[10], pkt[11]]);
            // a change of 1..=16 bytes outside the checksum field: in the
            // common header (ports, vtag) or anywhere in the chunks
            let mut n = [1usize, 2, 4, 4, 8, 16][r.below(6)];
            let o = if len - 12 < n || (n <= 8 && r.below(4) == 0) {
                n = n.min(8);
                r.below(8 - n + 1)
            } else {
                12 + r.below(len - 12 - n + 1)
            };
            assert!(o + n <= 8 || o >= 12, "case {case}");
            let newb = r.bytes(n);
            let oldb = pkt[o..o + n].to_vec();
            pkt[o..o + n].copy_from_slice(&newb);
            let full = sctp_checksum(&pkt);
            let after = (len - o - n) as u16;
            let inc = match n {
                1 => adjust::<1>(old, &[oldb[0]], &[newb[0]], after),
                2 => adjust::<2>(
                    old,
                    oldb[..].try_into().unwrap(),
                    newb[..].try_into().unwrap(),
                    after,
                ),
                4 => adjust::<4>(
                    old,
                    oldb[..].try_into().unwrap(),
                    newb[..].try_into().unwrap(),
                    after,
                ),
                8 => adjust::<8>(
                    old,
                    oldb[..].try_into().unwrap(),
                    newb[..].try_into().unwrap(),
                    after,
                ),
                16 => adjust::<16>(
                    old,
                    oldb[..].try_into().unwrap(),
                    newb[..].try_into().unwrap(),
                    after,
                ),
                _ => unreachable!(),
            };
            assert_eq!(inc, full, "case {case}: len {len} offset {o} n {n}");
            if n == 4 {
                let diff = u32::from_ne_bytes(oldb[..].try_into().unwrap())
                    ^ u32::from_ne_bytes(newb[..].try_into().unwrap());
                let f = adjust_fast_u32(old, diff, after);
                assert_eq!(f, full, "fast: case {case}");
                assert_eq!(
                    adjust_fast_u32_nb(old, diff, after),
                    full,
                    "branch-free: case {case}"
                );
            }
        }
    }

    #[test]
    fn several_changes_compose() {
        // ports and an IPv4 address parameter in the same packet, applied
        // one after the other (the datapath's order does not matter).
        let mut r = Rng(7);
        for _ in 0..2000 {
            let len = 40 + r.below(1400);
            let mut pkt = r.bytes(len);
            sctp_set_checksum(&mut pkt);
            let mut crc = from_wire([pkt[8], pkt[9], pkt[10], pkt[11]]);
            let (os, od) = (
                u16::from_ne_bytes([pkt[0], pkt[1]]),
                u16::from_ne_bytes([pkt[2], pkt[3]]),
            );
            let (ns, nd) = (r.next() as u16, r.next() as u16);
            pkt[0..2].copy_from_slice(&ns.to_ne_bytes());
            pkt[2..4].copy_from_slice(&nd.to_ne_bytes());
            let port_diff = u32::from_ne_bytes([
                (os ^ ns).to_ne_bytes()[0],
                (os ^ ns).to_ne_bytes()[1],
                (od ^ nd).to_ne_bytes()[0],
                (od ^ nd).to_ne_bytes()[1],
            ]);
            crc = adjust_fast_u32(crc, port_diff, (len - 4) as u16);
            let o = 12 + r.below(len - 12 - 4 + 1);
            let old = u32::from_ne_bytes(pkt[o..o + 4].try_into().unwrap());
            let new = r.next() as u32;
            pkt[o..o + 4].copy_from_slice(&new.to_ne_bytes());
            crc = adjust(
                crc,
                &old.to_ne_bytes(),
                &new.to_ne_bytes(),
                (len - o - 4) as u16,
            );
            assert_eq!(crc, sctp_checksum(&pkt));
            pkt[8..12].copy_from_slice(&to_wire(crc));
            assert!(sctp_checksum_ok(&pkt));
        }
    }

    #[test]
    fn unchanged_bytes_leave_the_checksum() {
        assert_eq!(
            adjust(0x1234_5678, &[1, 2, 3, 4], &[1, 2, 3, 4], 100),
            0x1234_5678
        );
        assert_eq!(
            adjust(0x1234_5678, &[7u8; 16], &[7u8; 16], 9000),
            0x1234_5678
        );
        assert_eq!(adjust_fast_u32(0x1234_5678, 0, 9000), 0x1234_5678);
    }
}
