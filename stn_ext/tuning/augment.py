"""Batch augmentations as tensor ops on the batch's device, one hyperparameter value per example.

Random numbers come from a ``BatchRandom``: it draws for the *global* batch (all data-parallel ranks
together) and returns this rank's rows, so a run on 2 processes uses exactly the random numbers of a
run on 1 process with the same global batch.
"""
import contextlib
import math

import torch


class BatchRandom:
    """Random draws for rows [offset, offset + local) of a global batch of ``global_batch`` rows."""

    def __init__(self, generator, global_batch, offset=0, local=None):
        self.generator = generator
        self.global_batch = global_batch
        self.offset = offset
        self.local = global_batch - offset if local is None else local
        self.tape = None  # a DrawTape recording or replaying this BatchRandom's draws

    def pick(self, fraction):
        """A part of the global batch, spread evenly: row i is picked iff floor((i + 1) f) > floor(i f), the same
        rows however the batch is split across ranks. Returns (this rank's picked rows as local indices, the
        BatchRandom of the picked batch), whose draws are those of a batch of the picked rows alone."""
        size = math.floor(self.global_batch * fraction)
        if size == 0:
            raise ValueError(f"stn_ext: a part {fraction} of a batch of {self.global_batch} rows picks none "
                             "(response_rows too small for the batch)")
        i = torch.arange(self.offset, self.offset + self.local, dtype=torch.float64)
        picked = torch.nonzero(torch.floor((i + 1) * fraction) > torch.floor(i * fraction)).flatten()
        return picked, BatchRandom(self.generator, size, math.floor(self.offset * fraction), len(picked))

    def _rows(self, t):
        return t[self.offset:self.offset + self.local]

    def _draw(self, fn, shape, device, dtype):
        if self.tape is not None and self.tape.replaying:
            return self.tape.next(shape, device, dtype)
        if self.tape is not None:
            self.tape.before_draw()
        out = fn(shape, generator=self.generator, device=device, dtype=dtype)
        if self.tape is not None:
            self.tape.record(out)
        return out

    def rand(self, *shape, device=None, dtype=torch.float32):
        device = self.generator.device if device is None else device
        return self._rows(self._draw(torch.rand, (self.global_batch,) + shape, device, dtype))

    def randn(self, *shape, device=None, dtype=torch.float32):
        device = self.generator.device if device is None else device
        return self._rows(self._draw(torch.randn, (self.global_batch,) + shape, device, dtype))

    def shared_rand(self, *shape, device=None, dtype=torch.float32):
        """One uniform draw shared by the whole batch (same on every rank), on ``device``."""
        return self._draw(torch.rand, shape, self.generator.device, dtype).to(device)

    def shared_randn(self, *shape, dtype=torch.float32):
        """One draw shared by the whole batch (same on every rank)."""
        return self._draw(torch.randn, shape, self.generator.device, dtype)


class DrawTape:
    """The draws a BatchRandom makes during one pass (``recording``), served again in order to a later pass with the
    same draws (``replaying``, Delta-STN's response by difference) instead of drawing them anew from the generator's
    state before the pass: the same numbers, without the second draw's cost (on the Fashion-MNIST MLP about 0.8 ms a
    step, a seventh of a fixed step). ``usable`` is False where the tape may not hold every draw as it was: something drew from the
    generator past the BatchRandom (the generator's state moved between its draws) or changed a draw in place; the
    caller then replays from ``start``, the generator's state before the pass."""

    def __init__(self, generator):
        self.generator, self.start = generator, generator.get_state()
        self.draws, self.replaying, self._at, self._state, self._versions = [], False, 0, self.start, []
        self.outside = False  # a draw from the generator not through the BatchRandom

    def before_draw(self):
        self.outside = self.outside or not torch.equal(self.generator.get_state(), self._state)

    def record(self, out):
        self.draws.append(out)
        self._versions.append(out._version)
        self._state = self.generator.get_state()

    def finish(self):
        """End the recording: the generator must be where the last draw left it."""
        self.before_draw()

    @property
    def usable(self):
        return not self.outside and all(d._version == v for d, v in zip(self.draws, self._versions))

    def rewind(self):
        """Serve the recorded draws again from the first (``replaying``)."""
        self.replaying, self._at = True, 0

    def next(self, shape, device, dtype):
        if self._at >= len(self.draws):
            raise RuntimeError("stn_ext: a replayed pass drew more random numbers than the pass it replays")
        d = self.draws[self._at]
        want = torch.device(device)
        if (tuple(d.shape) != tuple(shape) or d.dtype != dtype or d.device.type != want.type
                or want.index not in (None, d.device.index)):
            raise RuntimeError(f"stn_ext: a replayed pass drew {tuple(shape)} {dtype} on {device} where the pass it "
                               f"replays drew {tuple(d.shape)} {d.dtype} on {d.device}: the draws must not depend on "
                               "the hyperparameters' values")
        self._at += 1
        return d


@contextlib.contextmanager
def recording(rnd):
    """Record ``rnd``'s draws within the block on a DrawTape (yielded)."""
    tape = DrawTape(rnd.generator)
    rnd.tape = tape
    try:
        yield tape
    finally:
        rnd.tape = None
        tape.finish()


@contextlib.contextmanager
def replaying(rnd, tape):
    """``rnd`` serves the draws of ``tape`` (a finished, usable recording) in order within the block."""
    tape.rewind()
    rnd.tape = tape
    try:
        yield
    finally:
        rnd.tape, tape.replaying = None, False


def _per_example(v, B, device, dtype=torch.float32):
    v = torch.as_tensor(v, device=device, dtype=dtype)
    return v.expand(B) if v.dim() == 0 else v


def _check_images(x, what):
    if x.dim() != 4:
        raise ValueError(f"stn_ext: {what} needs image batches shaped (B, C, H, W), got {tuple(x.shape)}")


def gaussian_noise(x, std, rnd):
    """x + std_b * N(0, 1), std per example (B,) or scalar."""
    std = _per_example(std, x.shape[0], x.device, x.dtype)
    eps = rnd.randn(*x.shape[1:], device=x.device, dtype=x.dtype)
    return x + std.view((-1,) + (1,) * (x.dim() - 1)) * eps


def cutout(x, length, holes, rnd, max_holes=None):
    """Zero ``holes_b`` squares of side ``length_b`` (integers per example) at random centres (squares may
    cross the border, as in DeVries & Taylor 2017). ``max_holes`` bounds the draws (defaults to the
    largest value in ``holes``; pass the range's upper bound so the draws do not depend on the values)."""
    _check_images(x, "cutout")
    B, _, H, W = x.shape
    length = _per_example(length, B, x.device).round()
    holes = _per_example(holes, B, x.device).round()
    K = int(max_holes if max_holes is not None else (holes.max().item() if B else 0))
    if K <= 0:
        return x
    cy = (rnd.rand(K, device=x.device) * H).floor()  # (B, K)
    cx = (rnd.rand(K, device=x.device) * W).floor()
    ys = torch.arange(H, device=x.device, dtype=torch.float32)
    xs = torch.arange(W, device=x.device, dtype=torch.float32)
    lo = torch.div(length, 2, rounding_mode="floor")[:, None]  # (B, 1)
    y0, x0 = cy - lo, cx - lo  # top-left corners (B, K)
    in_y = (ys[None, None, :] >= y0[..., None]) & (ys[None, None, :] < (y0 + length[:, None])[..., None])
    in_x = (xs[None, None, :] >= x0[..., None]) & (xs[None, None, :] < (x0 + length[:, None])[..., None])
    active = torch.arange(K, device=x.device)[None, :] < holes[:, None]  # (B, K)
    box = in_y[..., :, None] & in_x[..., None, :] & active[..., None, None]  # (B, K, H, W)
    keep = ~box.any(1)
    return x * keep[:, None].to(x.dtype)


def random_shift(x, max_shift, rnd):
    """Shift each image by integers (dy, dx) drawn uniformly in [-s_b, s_b], filling with zeros.
    Two uniform numbers are drawn per example whatever s_b, so the draws do not depend on the values."""
    _check_images(x, "random shift")
    B, C, H, W = x.shape
    s = _per_example(max_shift, B, x.device).round()
    r = rnd.rand(2, device=x.device)  # (B, 2)
    d = (r * (2 * s[:, None] + 1)).floor() - s[:, None]  # integers in [-s, s]
    dy, dx = d[:, 0].long(), d[:, 1].long()
    ys = torch.arange(H, device=x.device)[None, :] - dy[:, None]  # source row for each target row (B, H)
    xs = torch.arange(W, device=x.device)[None, :] - dx[:, None]
    vy = (ys >= 0) & (ys < H)
    vx = (xs >= 0) & (xs < W)
    ys, xs = ys.clamp(0, H - 1), xs.clamp(0, W - 1)
    out = x.gather(2, ys[:, None, :, None].expand(B, C, H, W))
    out = out.gather(3, xs[:, None, None, :].expand(B, C, H, W))
    mask = (vy[:, :, None] & vx[:, None, :]).to(x.dtype)
    return out * mask[:, None]


def dropout_mask(x, rate, rnd):
    """Inverted-dropout mask for x with a rate per example (B,) or scalar: 0 with prob p_b, else 1/(1-p_b)."""
    u = rnd.rand(*x.shape[1:], device=x.device, dtype=x.dtype)
    p = torch.as_tensor(rate, device=x.device, dtype=x.dtype).clamp(0, 0.999)
    if p.dim() == 0:  # one rate for the batch (fixed values, or a shared perturbation): no per-row views
        return (u >= p) * (1 / (1 - p))
    p = _per_example(p, x.shape[0], x.device, x.dtype)
    row = (-1,) + (1,) * (x.dim() - 1)
    # keep (bool) times the per-example scale: one pass over the batch, the division only over B values
    return (u >= p.view(row)) * (1 / (1 - p)).view(row)
