"""Pure-Python reference of the exact reversible step, one element at a time, in Python integers.

Slow and simple: it states the algorithm of csrc/reversible_math.h (fixed point, momentum as the
bijection push(v mod 2^16) / pop(n), the per-element range-ANS buffer) so that tests can check the
compiled kernels against it bit for bit. Python floats are IEEE doubles and ``round`` rounds half to
even, as the kernels do.
"""
import struct

DEN_BITS = 16
DEN = 1 << DEN_BITS
M32 = (1 << 32) - 1
HEAD_EMPTY = 1 << 32


class Element:
    """x, v (fixed point), head and the list of spilled 32-bit words of one element."""

    def __init__(self, x, v):
        self.x, self.v = int(x), int(v)
        self.head = HEAD_EMPTY
        self.words = []

    # --- the buffer -----------------------------------------------------------------------------

    def _spill(self):
        self.words.append(self.head & M32)
        self.head >>= 32

    def _refill(self):
        if self.head < HEAD_EMPTY:
            if not self.words:
                raise RuntimeError("buffer underflow")
            self.head = (self.head << 32) | self.words.pop()

    def push_den(self, r):
        if self.head >= 1 << 48:
            self._spill()
        self.head = (self.head << DEN_BITS) | r

    def pop_den(self):
        r = self.head & (DEN - 1)
        self.head >>= DEN_BITS
        self._refill()
        return r

    @staticmethod
    def _symbol(n, s):
        q, rem = (1 << 32) // n, (1 << 32) % n
        if s < rem:
            return q + 1, s * (q + 1)
        return q, rem * (q + 1) + (s - rem) * q

    def pop_n(self, n):
        if n == 1:
            return 0
        q, rem = (1 << 32) // n, (1 << 32) % n
        slot = self.head & M32
        boundary = rem * (q + 1)
        s = slot // (q + 1) if slot < boundary else rem + (slot - boundary) // q
        f, c = self._symbol(n, s)
        self.head = f * (self.head >> 32) + slot - c
        self._refill()
        return s

    def push_n(self, n, s):
        if n == 1:
            return
        f, c = self._symbol(n, s)
        if self.head >= f << 32:
            self._spill()
        self.head = ((self.head // f) << 32) + self.head % f + c

    # --- the steps ------------------------------------------------------------------------------

    @staticmethod
    def grad_term(g, n, radix_bits):
        return round(((DEN - n) / DEN * float(g)) * 2.0**radix_bits)

    def step(self, g, lr, n, radix_bits):
        delta = self.grad_term(g, n, radix_bits)
        if n != DEN:
            r = self.v & (DEN - 1)
            q = self.v >> DEN_BITS
            self.push_den(r)
            self.v = q * n + self.pop_n(n)
        self.v -= delta
        self.x += round(float(lr) * float(self.v))
        check_range(self.x, self.v)

    def unstep(self, g, lr, n, radix_bits):
        self.x -= round(float(lr) * float(self.v))
        w = self.v + self.grad_term(g, n, radix_bits)
        if n != DEN:
            q, s = divmod(w, n)  # floor division, s in [0, n)
            self.push_n(n, s)
            w = q * DEN + self.pop_den()
        self.v = w
        check_range(self.x, self.v)

    def view(self, radix_bits):
        """float32 view: the double x * 2^-radix rounded once to float32."""
        return struct.unpack("f", struct.pack("f", float(self.x) * 2.0**-radix_bits))[0]


def check_range(*values):
    for a in values:
        if not -(1 << 63) <= a < (1 << 63):
            raise OverflowError("fixed-point overflow")
