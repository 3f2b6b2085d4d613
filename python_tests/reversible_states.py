"""States of the reversible ops for the tests that hold the CPU's vector paths against the scalar element
maths (test_reversible.py) and against the emulated CUDA kernels (test_simt.py)."""
import torch


def _i64(values):
    """int64 tensor of Python integers taken mod 2^64 (uint64 bit patterns)."""
    return torch.tensor([((a + (1 << 63)) % (1 << 64)) - (1 << 63) for a in values], dtype=torch.long)


def edge_unstep_state(n, gnum, capacity, gen):
    """Arbitrary (not only reachable) states at the edges of the CPU's vector path for the reverse ops: the
    spill threshold f 2^32 and the refill threshold f 2^16 of the head (f = q or q + 1), quotients next to
    2^32, remainders next to the symbol boundary rem, |w| next to 2^51, huge velocities and weights, empty
    and full stacks, and gradients that are zero, huge or not finite."""
    q, rem = (1 << 32) // gnum, (1 << 32) % gnum
    rng = torch.randint(0, 1 << 62, (n, 12), generator=gen).tolist()
    v, head, g, x = [], [], [], []
    for i in range(n):
        r = rng[i]
        kind = r[0] % 8
        # w = v (g = 0 for most): floor(w / n) and a chosen remainder
        s = [0, gnum - 1, max(rem - 1, 0), rem % gnum, r[1] % gnum][r[2] % 5]
        qf = (r[3] % (1 << (r[4] % 52))) * (-1 if r[5] % 2 else 1)
        w = qf * gnum + s
        if kind == 0:
            w = (1 << 51) - 1 - (r[6] % 3) * gnum if r[5] % 2 else -(1 << 51) + (r[6] % 3)
        elif kind == 1:
            w = (r[6] % (1 << 63)) * (-1 if r[5] % 2 else 1)
        v.append(w)
        f = q + 1 if s < rem else q
        choice = r[7] % 7
        if choice == 0:
            h = (f << 32) + (r[8] % 5) - 2          # the spill threshold
        elif choice == 1:
            h = (f << 16) + (r[8] % 5) - 2          # the refill threshold (no spill)
        elif choice == 2:
            h = (f << 32) - 1 - (r[8] % f)          # quotient 2^32 - 1
        elif choice == 3:
            h = (1 << 64) - 1 - (r[8] % 1000)
        elif choice == 4:
            h = (1 << 32) + (r[8] % 1000)
        else:
            h = (1 << 32) + r[8] % ((1 << (32 + r[9] % 33)) - (1 << 32) + 1)
        head.append(min(max(h, 1 << 32), (1 << 64) - 1))
        gk = r[10] % 12
        g.append([0.0, 0.0, 0.0, 0.0, 0.0, 1e-3, -7.5, 1e300, float("nan"), float("inf"), 3.9e-3, -1e-9][gk])
        x.append((r[11] % (1 << 63)) * (-1 if r[11] % 3 == 0 else 1) if r[0] % 5 == 0 else (r[11] % (1 << 54)))
    count = torch.tensor([0 if rng[i][9] % 5 == 0 else capacity if rng[i][9] % 5 == 1 else rng[i][9] % capacity
                          for i in range(n)], dtype=torch.int32)
    words = torch.randint(-(1 << 31), 1 << 31, (capacity, n), generator=gen, dtype=torch.int64).int()
    return dict(x=_i64(x), v=_i64(v), head=_i64(head), count=count, words=words,
                status=torch.zeros(2, dtype=torch.long)), torch.tensor(g, dtype=torch.float64)
