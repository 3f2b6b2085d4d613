"""The recurrence of one STN LSTM layer with per-example lam, as one autograd node.

Given the input term of every step, pre (B, T, 4H) = x_t W_ih(lam_b)^T + b_ih(lam_b) + b_hh(lam_b), each step adds
h_{t-1} W_hh(lam_b)^T = e + s (.) u with [e | u] = h_{t-1} [W_e; W_h]^T (one per-example linear op), then the cell.
Left to autograd step by step, the backward would form the weight gradient at every step (two (4H, H) GEMMs of
inner size B, and their sums); here it is one GEMM over all steps at the end, as torch's own LSTM kernels do:

    per step, backward:  dgates_t from the cell;  dh_{t-1} = [dgates_t | s (.) dgates_t] [W_e; W_h]
    at the end:          d[W_e; W_h] = [dG | s (.) dG]^T H_prev   (inner size B*T);   ds = sum_t dG_t (.) u_t

A double backward (create_graph) recomputes the step-by-step forward from the saved inputs and differentiates
that, so second derivatives stay exact.
"""
import torch

from stn_ext import ops

_ops = ops._ops


def _cell(gates, c):
    """LSTM cell on pre-activations (torch's gate order i, f, g, o): (h, c, activations)."""
    i, f, g, o = gates.chunk(4, 1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    return o * torch.tanh(c), c, (i, f, g, o)


def recurrence_by_steps(pre, h0, c0, w_e, w_h, s):
    """The same maths left to autograd step by step: output (B, T, H), h_n, c_n."""
    h, c, outputs = h0, c0, []
    for pre_t in pre.unbind(1):
        h, c, _ = _cell(ops.per_example_linear(h, w_e, w_h, s, pre_t), c)
        outputs.append(h)
    return torch.stack(outputs, 1), h, c


class _Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, h0, c0, w_e, w_h, s):
        h, c = h0, c0
        hs, cs, acts, us = [], [], [], []
        for pre_t in pre.unbind(1):
            gates, u = _ops.per_example_linear(h, w_e, w_h, s, pre_t)
            h, c, act = _cell(gates, c)
            hs.append(h)
            cs.append(c)
            acts.append(torch.cat(act, 1))
            us.append(u)
        out = torch.stack(hs, 1)
        ctx.save_for_backward(pre, h0, c0, w_e, w_h, s, out, torch.stack(cs, 1), torch.stack(acts, 1),
                              torch.stack(us, 1))
        return out, h.clone(), c.clone()

    @staticmethod
    def backward(ctx, d_out, d_h, d_c):
        pre, h0, c0, w_e, w_h, s, out, cs, acts, us = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the step-by-step forward instead
            inputs = (pre, h0, c0, w_e, w_h, s)
            with torch.enable_grad():
                outputs = recurrence_by_steps(*inputs)
            return torch.autograd.grad(outputs, inputs, (d_out, d_h, d_c), create_graph=True, allow_unused=True,
                                       materialize_grads=True)
        T = pre.shape[1]
        weight = torch.cat([w_e, w_h])  # (8H, H)
        dh, dc, dgates = d_h, d_c, [None] * T
        for t in reversed(range(T)):
            dh = dh + d_out[:, t]
            i, f, g, o = acts[:, t].chunk(4, 1)
            tc = torch.tanh(cs[:, t])
            c_prev = cs[:, t - 1] if t > 0 else c0
            dc = dc + dh * o * (1 - tc * tc)
            dgate = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                               dh * tc * o * (1 - o)], 1)
            dc = dc * f
            dh = torch.cat([dgate, dgate * s], 1) @ weight
            dgates[t] = dgate
        d_pre = torch.stack(dgates, 1)  # (B, T, 4H)
        B, four_h = s.shape
        stacked = torch.cat([d_pre, d_pre * s.unsqueeze(1)], 2).reshape(B * T, 2 * four_h)
        h_prev = torch.cat([h0.unsqueeze(1), out[:, :-1]], 1).reshape(B * T, -1)
        d_weight = stacked.t() @ h_prev
        d_s = (d_pre * us).sum(1)
        return d_pre, dh, dc, d_weight[:four_h], d_weight[four_h:], d_s


def recurrence(pre, h0, c0, w_e, w_h, s):
    """One layer's recurrence: pre (B, T, 4H), h0, c0 (B, H), W_e, W_h (4H, H), s = lam V_hh^T (B, 4H).
    Returns output (B, T, H), h_n, c_n."""
    return _Recurrence.apply(pre, h0, c0, w_e, w_h, s)
