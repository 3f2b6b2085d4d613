"""A control variate for the response's gradients with one perturbation per batch (issue 22).

With one perturbation d = lam~ - u for the whole batch, the hypernet path's gradient is (V d) (.) g(d) on W_h and
d (g(d) . W_h) row by row on V, g(d) the training gradient at the effective weights. Its mean is the response's own
least-squares signal, of order sigma^2 times the weights' curvature along it. Its noise is led by g(0) d: zero mean,
but as large as the weights' gradient itself while they are still converging. Before the weights converge, that noise
can set the response's direction: on ridge started 100x below the optimum, where the signal is proportional to the
tiny weight decay, STN's response took the wrong sign in one seed of three on four family instances, and u ran to the
range's edge.

The baseline b is a running mean of earlier steps' gradients on the elementary weights (W_e, b_e), and beta, per
layer, the running regression of each step's gradient on the mean before it (<g, b> / <b, b>, clamped to [0, 1]).
Neither depends on this step's d, so subtracting beta times the gradient of <b, path(d)> from the response's
gradients leaves their mean as it was and takes out the part of g(0) that b tracks. beta is ~1 while the weights
descend; where their gradient is fresh noise around 0 (weights converged under a large weight decay) a full
subtraction only adds b's own noise, and on ridge from 100x above it tipped STN into four roll-backs (against one)
and a run that ended 3.2 log units off; with beta there, two and 0.009. Per example the batch averages B
perturbations and the baseline is not used.

It serves while the weights descend, and stops for good once every layer's beta is below 1/2: then most of the
weights' gradient is fresh noise that the mean does not predict, and the response's sign, which their descent could
set, is set. beta is judged from the first correction on (the warm-up's end), then after every memory's worth of steps
(1 / (1 - decay)): within the warm-up it dips for other reasons (momentum SGD's first steps swing, and a fast-shrinking
gradient has a small regression on the larger ones before it: beta 0.23 at step 20-70 on a ridge instance whose
weights then descend with beta ~0.95 until step ~1400). With momentum SGD on real data consecutive minibatch
gradients are not aligned (beta < 0 by the warm-up's end on Fashion-MNIST, digits and the language model), so there it
stops at the first correction, before it corrects anything, and costs nothing after."""
import torch

DEFAULT_DECAY = 0.9  # about the last ten steps: the weights' gradient moves little over them
STOP_BELOW = 0.5  # every layer's beta below it: the weights' descent is over, and the baseline stops for good


@torch.no_grad()
def subtract_along_path(layers, grads, d, beta=None):
    """Subtract the gradient of <g, path(d)> from the response parameters' .grad, g the elementary weights'
    gradients ``grads`` (flat: weight[, bias] per layer of ``layers``), scaled per layer by ``beta`` ((layers,);
    None: 1): (V d) (.) g from W_h's, d (g . W_h) per gate from V's, likewise for C and b_h. Linear in d and, for a
    g that does not depend on d, of zero mean: a control variate for the response's gradients."""
    d, i = d.detach(), 0
    for k, m in enumerate(layers):
        b = 1.0 if beta is None else beta[k]
        g = grads[i]
        if m.weight_hyper.grad is not None:
            m.weight_hyper.grad.addcmul_(m.gate(d).mul_(b), g, value=-1)
        if m.hyper_weight.grad is not None:
            per_gate = m.gate_rows(g * m.weight_hyper).sum(1)
            m.hyper_weight.grad.addr_(per_gate.mul_(b), d, alpha=-1)
        i += 1
        if m.bias_elem is not None:  # a layer with b_e has b_h and C too
            g_b = grads[i]
            if m.bias_hyper.grad is not None:
                m.bias_hyper.grad.addcmul_((m.hyper_bias @ d).mul_(b), g_b, value=-1)
            if m.hyper_bias.grad is not None:
                m.hyper_bias.grad.addr_(g_b * m.bias_hyper * b, d, alpha=-1)
            i += 1


class ResponseBaseline:
    """Running mean (decay ``decay``) of the elementary weights' gradients of ``layers`` (STN layers), and the
    correction it makes to their response parameters' gradients."""

    def __init__(self, layers, decay=DEFAULT_DECAY):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"stn_ext: the response baseline's decay must be in (0, 1), got {decay!r}")
        self.layers, self.decay, self.mean, self.fit, self.stopped = layers, decay, None, None, False
        self.seen, self.corrections = 0, 0  # steps in the mean, corrections made
        self._memory = max(1, round(1.0 / (1.0 - decay)))
        self._spans, i = [], 0  # each layer's (first index, count) in the flat list of means: weight[, bias]
        for m in layers:
            self._spans.append((i, len(self._elementary(m))))
            i += self._spans[-1][1]

    @staticmethod
    def _elementary(m):
        return (m.weight_elem,) if m.bias_elem is None else (m.weight_elem, m.bias_elem)

    @torch.no_grad()
    def observe(self):
        """Fold the elementary weights' gradients (set on .grad) into the mean, and each layer's <g, mean>,
        <mean, mean> into beta's regression; no-op where they have no gradient."""
        if self.stopped:  # the usual state on real data from the warm-up's end: nothing to gather
            return
        grads = [p.grad for m in self.layers for p in self._elementary(m)]
        if any(g is None for g in grads):
            return
        self.seen += 1
        if self.mean is None:
            self.mean = [g.detach().clone() for g in grads]
            self.fit = torch.zeros(len(self.layers), 2, dtype=grads[0].dtype, device=grads[0].device)
            return
        flat = [(g.reshape(-1), b.reshape(-1)) for g, b in zip(grads, self.mean)]
        dots = torch.stack([torch.stack([torch.dot(g, b), torch.dot(b, b)]) for g, b in flat])
        self.fit.lerp_(torch.stack([dots[i:i + n].sum(0) for i, n in self._spans]), 1.0 - self.decay)
        torch._foreach_lerp_(self.mean, grads, 1.0 - self.decay)
        if self.corrections and self.seen % self._memory == 0:
            self._judge()

    def _judge(self):
        """Stop for good where every layer's beta is below STOP_BELOW (one sync); True if it did."""
        if self.seen >= self._memory and bool((self.beta() < STOP_BELOW).all()):
            self.stopped, self.mean, self.fit = True, None, None
        return self.stopped

    def beta(self):
        """Per layer, the running regression of a step's gradient on the mean before it, clamped to [0, 1]."""
        return (self.fit[:, 0] / self.fit[:, 1].clamp_min(torch.finfo(self.fit.dtype).tiny)).clamp(0.0, 1.0)

    @torch.no_grad()
    def correct(self, d):
        """Subtract beta times the gradient of <mean, path(d)> (d (n,): lam~ - u) from the response parameters'
        .grad (``subtract_along_path``). Call before ``observe`` for the same step: the mean must not hold this
        step's gradient (it depends on d)."""
        if self.mean is None or (not self.corrections and self._judge()):
            return
        self.corrections += 1
        subtract_along_path(self.layers, self.mean, d, self.beta())

    def state_dict(self):
        if self.stopped:
            return {"stopped": True}
        if self.mean is None:
            return None
        return {"mean": [t.clone() for t in self.mean], "fit": self.fit.clone(), "seen": self.seen,
                "corrections": self.corrections}

    def load_state_dict(self, st):
        self.stopped = bool(st is not None and st.get("stopped", False))
        live = st is not None and not self.stopped
        self.mean = [t.clone() for t in st["mean"]] if live else None
        self.fit = st["fit"].clone() if live else None
        self.seen = st.get("seen", 0) if live else 0
        self.corrections = st.get("corrections", 0) if live else 0
