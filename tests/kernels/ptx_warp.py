"""A small interpreter of the PTX subset memfit's KV mma asm uses (memfit.kernels.kv_mma_ptx),
run for one warp on the CPU: every register is a (32,) array, one value per lane, and the
warp-wide instructions (mma.sync m16n8k16, movmatrix, shfl.bfly) gather and scatter the
fragments as the PTX ISA lays them out. Tests run the generated asm text through it, so an
operand slip, a wrong fragment or a wrong constant shows on a machine without a GPU.

Arithmetic: float16 products and sums as numpy computes them (correctly rounded), the mma in
float32 (the hardware's truncating sums differ in the last bits), ex2/lg2/rcp exactly. The
float16 and bfloat16 m16n8k16 mma are modelled (any other unknown instruction raises
NotImplementedError). Also run: predicated instructions (`@p` / `@!p`: only the lanes where
the guard holds are written, and only they read memory), scalar and 16-byte vector loads
(naturally aligned addresses, checked, as PTX requires), and shifts clamped as PTX defines them
(an amount of 32 or more gives 0)."""

from __future__ import annotations

import re

import numpy as np

LANES = np.arange(32)


def _f32(x):
    return np.asarray(x, np.uint32).view(np.float32)


def _u32(x):
    return np.asarray(x, np.float32).view(np.uint32)


def _halves(x, bf16: bool = False):
    """The two 16-bit floats of each 32-bit x (low, high), as float16 or (bf16) float32."""
    x = np.asarray(x, np.uint32)
    if bf16:  # a bfloat16 is a float32's upper half
        return (x << 16).view(np.float32), (x & 0xFFFF0000).view(np.float32)
    return ((x & 0xFFFF).astype(np.uint16).view(np.float16),
            (x >> 16).astype(np.uint16).view(np.float16))


def _pack(lo, hi):
    lo = np.asarray(lo, np.float16).view(np.uint16).astype(np.uint32)
    hi = np.asarray(hi, np.float16).view(np.uint16).astype(np.uint32)
    return lo | (hi << 16)


def _shift(a, n, left: bool):
    """32-bit shift of a by n, as PTX clamps it: n >= 32 gives 0 (shl.b32, shr.u32)."""
    a = np.asarray(a, np.uint64)
    n = np.asarray(n, np.uint64)
    out = (a << np.minimum(n, 32)) if left else (a >> np.minimum(n, 32))
    return (out & 0xFFFFFFFF).astype(np.uint32)


_LOADS = {"ld.global.nc.b16": 2, "ld.global.nc.u16": 2, "ld.global.nc.b32": 4,
          "ld.global.nc.u8": 1}


class Warp:
    """One warp's registers and a byte-addressed memory for ld.global (addresses are offsets
    into `memory`)."""

    def __init__(self, memory: np.ndarray | None = None):
        self.r: dict[str, np.ndarray] = {}
        self.memory = memory
        self.active: np.ndarray | None = None  # the guard of a predicated instruction

    def run(self, text: str, operands: list[np.ndarray]) -> list[np.ndarray]:
        """Run asm `text` with operands $0.. (each a (32,) uint32/uint64 array; outputs first,
        their initial values unused); returns the operands after the run."""
        ops = [np.array(o, copy=True) for o in operands]
        for line in text.splitlines():
            line = line.strip().rstrip(";")
            if not line or line in "{}" or line.startswith(".reg"):
                continue
            self._exec(line, ops)
        return ops

    # operands ---------------------------------------------------------------------------
    def _get(self, tok: str, ops):
        tok = tok.strip()
        if tok.startswith("$"):
            return ops[int(tok[1:])]
        if tok.startswith("0f"):
            return np.full(32, int(tok.removeprefix("0f"), 16), np.uint32)
        if tok.startswith("0x"):
            return np.full(32, int(tok, 16), np.uint64)
        if re.fullmatch(r"-?\d+", tok):
            return np.full(32, int(tok), np.int64)
        if tok == "%laneid":
            return LANES.astype(np.uint32)
        return self.r[tok]

    def _set(self, tok: str, val, ops):
        tok = tok.strip()
        if tok.startswith("$"):
            ops[int(tok[1:])] = np.asarray(val)
        else:
            self.r[tok] = np.asarray(val)

    def _addr(self, at: str, nbytes: int, ops) -> np.ndarray:
        """Each lane's address of operand `at` ("[reg]", "[reg+off]") for an access of `nbytes`;
        an active lane's must be aligned to `nbytes` and inside `memory`, an inactive lane's (a
        failed guard) is not read and comes back as 0."""
        base, _, off = at.strip().strip("[]").partition("+")
        addr = self._get(base, ops).astype(np.int64) + (int(off) if off.strip() else 0)
        live = np.ones(32, bool) if self.active is None else self.active
        bad = live & ((addr % nbytes != 0) | (addr < 0) | (addr + nbytes > len(self.memory)))
        if bad.any():
            raise ValueError(f"ld of {nbytes} bytes at {at}: misaligned or outside memory in "
                             f"lanes {np.flatnonzero(bad).tolist()}: {addr[bad].tolist()}")
        return np.where(live, addr, 0)

    def _word(self, addr: np.ndarray, nbytes: int) -> np.ndarray:
        """The little-endian value of `nbytes` (<= 4) at each address, as uint32 (inactive
        lanes: 0)."""
        val = np.zeros(32, np.uint32)
        for k in range(nbytes):
            val |= self.memory[addr + k].astype(np.uint32) << np.uint32(8 * k)
        return val if self.active is None else np.where(self.active, val, np.uint32(0))

    def _guarded(self, guard: str, line: str, ops):
        """`@p line` / `@!p line`: run line, then keep the old value of whatever it wrote in the
        lanes where the guard fails (a register never written before reads 0 there)."""
        pred = self._get(guard.lstrip("!"), ops).astype(bool)
        if guard.startswith("!"):
            pred = ~pred
        regs, before = dict(self.r), list(ops)
        self.active = pred
        try:
            self._exec(line, ops)
        finally:
            self.active = None
        for k, v in self.r.items():
            if v is not regs.get(k):
                self.r[k] = np.where(pred, v, regs.get(k, np.zeros_like(v)))
        for k, v in enumerate(ops):
            if v is not before[k]:
                ops[k] = np.where(pred, v, before[k])

    # instructions -----------------------------------------------------------------------
    def _exec(self, line: str, ops):
        op, _, rest = line.partition(" ")
        if op.startswith("@"):
            return self._guarded(op[1:], rest.strip(), ops)
        if op == "ld.global.nc.v4.b32":  # {d0, d1, d2, d3}, [addr]: 16 bytes, 16-byte aligned
            m = re.fullmatch(r"\{([^}]*)\}\s*,\s*(\[[^\]]*\])", rest.strip())
            dst = [t.strip() for t in m.group(1).split(",")]
            addr = self._addr(m.group(2), 16, ops)
            for k, d in enumerate(dst):  # d_k: bytes 4k..4k + 3
                self._set(d, self._word(addr + 4 * k, 4), ops)
            return None
        if op.startswith("mma.sync"):
            return self._mma(op, rest, ops)
        args = [a.strip() for a in re.split(r",(?![^\[]*\])", rest)]
        g = lambda k: self._get(args[k], ops)
        u32 = lambda k: np.asarray(g(k)).astype(np.uint64).astype(np.uint32)
        if op == "mov.b32" and rest.startswith("{"):  # unpack a pair of 16-bit halves
            lo, hi, src = (t.strip(" {}") for t in rest.replace("}", ",").split(",")
                           if t.strip(" {}"))
            x = self._get(src, ops).astype(np.uint64).astype(np.uint32)
            self._set(lo, x & 0xFFFF, ops)
            self._set(hi, x >> 16, ops)
        elif op in ("mov.b32", "mov.f32", "mov.u32", "mov.b16"):
            self._set(args[0], u32(1), ops)
        elif op == "and.b32":
            self._set(args[0], u32(1) & u32(2), ops)
        elif op == "or.b32":
            self._set(args[0], u32(1) | u32(2), ops)
        elif op == "setp.ne.u32":
            self._set(args[0], u32(1) != u32(2), ops)
        elif op == "selp.b32":
            self._set(args[0], np.where(self._get(args[3], ops), u32(1), u32(2)), ops)
        elif op == "lop3.b32":
            assert args[4] == "0xEA", args  # (a & b) | c
            self._set(args[0], (u32(1) & u32(2)) | u32(3), ops)
        elif op in ("shr.u32", "shl.b32"):
            self._set(args[0], _shift(u32(1), u32(2), op == "shl.b32"), ops)
        elif op == "cvt.u32.u16":  # zero-extend the low 16 bits
            self._set(args[0], u32(1) & 0xFFFF, ops)
        elif op == "cvt.rn.f32.u32":
            self._set(args[0], _u32(u32(1).astype(np.float32)), ops)
        elif op == "neg.f32":  # flips the sign bit
            self._set(args[0], u32(1) ^ np.uint32(0x80000000), ops)
        elif op == "mul.rn.f16x2":
            (a0, a1), (b0, b1) = _halves(u32(1)), _halves(u32(2))
            self._set(args[0], _pack(a0 * b0, a1 * b1), ops)
        elif op == "prmt.b32":
            self._set(args[0], self._prmt(u32(1), u32(2), int(args[3], 16)), ops)
        elif op == "movmatrix.sync.aligned.m8n8.trans.b16":
            m = u32(1)
            lo, hi = m & 0xFFFF, m >> 16
            mat = np.zeros((8, 8), np.uint32)  # lane (g, j): row g, columns 2j, 2j + 1
            mat[LANES // 4, 2 * (LANES % 4)] = lo
            mat[LANES // 4, 2 * (LANES % 4) + 1] = hi
            t = mat.T
            self._set(args[0], t[LANES // 4, 2 * (LANES % 4)]
                      | (t[LANES // 4, 2 * (LANES % 4) + 1] << 16), ops)
        elif op == "shfl.sync.bfly.b32":
            self._set(args[0], u32(1)[LANES ^ int(args[2])], ops)
        elif op in ("max.f32", "add.f32", "sub.f32", "mul.f32"):
            a, b = _f32(u32(1)), _f32(u32(2))
            f = {"max.f32": np.maximum, "add.f32": np.add, "sub.f32": np.subtract,
                 "mul.f32": np.multiply}[op]
            with np.errstate(invalid="ignore"):
                self._set(args[0], _u32(f(a, b)), ops)
        elif op == "fma.rn.f32":
            a, b, c = (_f32(u32(k)).astype(np.float64) for k in (1, 2, 3))
            self._set(args[0], _u32((a * b + c).astype(np.float32)), ops)
        elif op == "ex2.approx.ftz.f32":
            self._set(args[0], _u32(np.exp2(_f32(u32(1)))), ops)
        elif op == "rcp.rn.f32":
            self._set(args[0], _u32(np.float32(1) / _f32(u32(1))), ops)
        elif op == "lg2.approx.f32":
            self._set(args[0], _u32(np.log2(_f32(u32(1)))), ops)
        elif op == "cvt.rn.f16x2.f32":  # d = (hi: a, lo: b)
            self._set(args[0], _pack(_f32(u32(2)), _f32(u32(1))), ops)
        elif op == "cvt.f32.f16":
            h = (u32(1) & 0xFFFF).astype(np.uint16).view(np.float16)
            self._set(args[0], _u32(h.astype(np.float32)), ops)
        elif op == "mul.wide.u32":
            self._set(args[0], u32(1).astype(np.uint64) * u32(2).astype(np.uint64), ops)
        elif op == "add.s64":
            self._set(args[0], g(1).astype(np.uint64) + g(2).astype(np.uint64), ops)
        elif op in _LOADS:  # zero-extended into the (32-bit) destination
            self._set(args[0], self._word(self._addr(args[1], _LOADS[op], ops), _LOADS[op]), ops)
        elif op == "prefetch.global.L2":
            pass
        else:
            raise NotImplementedError(line)

    @staticmethod
    def _prmt(a, b, sel):
        if any((sel >> (4 * k)) & 0x8 for k in range(4)):
            raise NotImplementedError(f"prmt selector {sel:#x} (sign replication)")
        bytes_ = [(a >> (8 * k)) & 0xFF for k in range(4)] + [(b >> (8 * k)) & 0xFF
                                                              for k in range(4)]
        out = np.zeros_like(a)
        for k in range(4):
            out |= bytes_[(sel >> (4 * k)) & 0x7] << (8 * k)
        return out

    def _mma(self, op: str, rest: str, ops):
        kinds = {f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32": t == "bf16"
                 for t in ("f16", "bf16")}
        if op not in kinds:
            raise NotImplementedError(f"{op} (only the float16 / bfloat16 m16n8k16 mma)")
        bf16 = kinds[op]
        groups = re.findall(r"\{([^}]*)\}", rest)
        d, a, b, c = ([t.strip() for t in grp.split(",")] for grp in groups)
        av = [self._get(t, ops).astype(np.uint32) for t in a]
        bv = [self._get(t, ops).astype(np.uint32) for t in b]
        cv = [_f32(self._get(t, ops).astype(np.uint32)) for t in c]
        gq, tq = LANES // 4, LANES % 4
        A = np.zeros((16, 16), np.float32)
        for k, (row, col) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
            lo, hi = _halves(av[k], bf16)
            A[gq + row, 2 * tq + col] = lo
            A[gq + row, 2 * tq + col + 1] = hi
        B = np.zeros((16, 8), np.float32)
        for k, col in enumerate((0, 8)):
            lo, hi = _halves(bv[k], bf16)
            B[2 * tq + col, gq] = lo
            B[2 * tq + col + 1, gq] = hi
        C = np.zeros((16, 8), np.float32)
        for k, (row, col) in enumerate(((0, 0), (0, 1), (8, 0), (8, 1))):
            C[gq + row, 2 * tq + col] = cv[k]
        D = (A.astype(np.float64) @ B.astype(np.float64) + C).astype(np.float32)
        for k, (row, col) in enumerate(((0, 0), (0, 1), (8, 0), (8, 1))):
            self._set(d[k], _u32(D[gq + row, 2 * tq + col]), ops)
