"""Pure-PyTorch reference of the STN layers (MacKay et al. 2019, Eq. 10), used by the tests and
benchmarks. Written for clarity: the per-example path runs two GEMMs/convs and broadcasts."""
import torch
import torch.nn.functional as F


def _hyper_terms(lam, hyper_weight, hyper_bias):
    s = lam @ hyper_weight.t()
    t = lam @ hyper_bias.t() if hyper_bias is not None else None
    return s, t


def gated_weight(lam, weight_elem, weight_hyper, hyper_weight):
    """W(lam) = W_e + (V lam) (.)row W_h for a shared lam of shape (n,)."""
    s = hyper_weight @ lam
    return weight_elem + s.view((-1,) + (1,) * (weight_elem.dim() - 1)) * weight_hyper


def gated_bias(lam, bias_elem, bias_hyper, hyper_bias):
    """b(lam) = b_e + (C lam) (.) b_h (shared lam), or b_e, or None."""
    if bias_elem is None:
        return None
    if bias_hyper is None:
        return bias_elem
    return bias_elem + (hyper_bias @ lam) * bias_hyper


def stn_linear(x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem=None, bias_hyper=None, hyper_bias=None):
    if lam.dim() == 1:
        w = gated_weight(lam, weight_elem, weight_hyper, hyper_weight)
        return F.linear(x, w, gated_bias(lam, bias_elem, bias_hyper, hyper_bias))
    s, t = _hyper_terms(lam, hyper_weight, hyper_bias)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (s.shape[1],)  # not -1: ambiguous for an empty batch
    y = F.linear(x, weight_elem) + s.view(shape) * F.linear(x, weight_hyper)
    if bias_elem is not None:
        y = y + bias_elem
    if bias_hyper is not None:
        y = y + t.view(shape) * bias_hyper
    return y


def stn_conv2d(x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem=None, bias_hyper=None, hyper_bias=None,
               stride=1, padding=0, dilation=1, groups=1):
    if lam.dim() == 1:
        w = gated_weight(lam, weight_elem, weight_hyper, hyper_weight)
        b = gated_bias(lam, bias_elem, bias_hyper, hyper_bias)
        return F.conv2d(x, w, b, stride, padding, dilation, groups)
    s, t = _hyper_terms(lam, hyper_weight, hyper_bias)
    conv = lambda w: F.conv2d(x, w, None, stride, padding, dilation, groups)  # noqa: E731
    y = conv(weight_elem) + s[:, :, None, None] * conv(weight_hyper)
    if bias_elem is not None:
        y = y + bias_elem[:, None, None]
    if bias_hyper is not None:
        y = y + (t * bias_hyper)[:, :, None, None]
    return y


def _lstm_gates(x, lam, p, mask=None):
    """x W(lam)^T + b(lam) for one of an LSTM layer's STN weights p (4*hidden rows), its weight times mask
    when given: (W_e + s (.)row W_h) (.) M = W_e (.) M + s (.)row (W_h (.) M), per example too."""
    w_e, w_h, v, b_e, b_h, c = p
    if mask is not None:
        w_e, w_h = w_e * mask, w_h * mask
    if lam is None:
        return F.linear(x, w_e, b_e)
    return stn_linear(x, lam, w_e, w_h, v, b_e, b_h, c)


def stn_lstm(input, hx, lam, params, dropout=0.0, training=False, batch_first=False, weight_hh_mask=None):
    """Self-tuning LSTM as an explicit cell loop on the gated weights (torch's gate order i, f, g, o):

        gates = x_t W_ih(lam)^T + b_ih(lam) + h W_hh(lam)^T + b_hh(lam)
        c = sigmoid(f) c + sigmoid(i) tanh(g);   h = sigmoid(o) tanh(c)

    Arguments as stn_ext.functional.stn_lstm (batched input, no packed sequences); lam None: the
    elementary weights alone. Dropout (training only) on each layer's input but the first, as nn.LSTM."""
    x = input.transpose(0, 1) if batch_first else input  # (T, B, in)
    n_layers, hidden = len(params), params[0][1][0].shape[1]
    if hx is None:
        zeros = x.new_zeros(n_layers, x.shape[1], hidden)
        hx = (zeros, zeros)
    masks = list(weight_hh_mask) if isinstance(weight_hh_mask, (list, tuple)) else [weight_hh_mask] * n_layers
    h_n, c_n = [], []
    for layer, ((ih, hh), mask) in enumerate(zip(params, masks)):
        if layer > 0:
            x = F.dropout(x, dropout, training)
        h, c = hx[0][layer], hx[1][layer]
        outputs = []
        for x_t in x.unbind(0):
            i, f, g, o = (_lstm_gates(x_t, lam, ih) + _lstm_gates(h, lam, hh, mask)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        x = torch.stack(outputs)
        h_n.append(h)
        c_n.append(c)
    return (x.transpose(0, 1) if batch_first else x), (torch.stack(h_n), torch.stack(c_n))


def stn_embedding(input, lam, weight_elem, weight_hyper, hyper_weight, padding_idx=None, batch_dim=0):
    """Self-tuning embedding: the table W(lam) = W_e + W_h (.)col (V lam), scaled per embedding dimension
    (weights (num_embeddings, embedding_dim), V (embedding_dim, n)); per example (lam (B, n), B =
    input.shape[batch_dim]) each example's rows W_e[i] + s_b (.) W_h[i] with s = lam V^T."""
    if lam.dim() == 1:
        table = weight_elem + weight_hyper * (hyper_weight @ lam)
        return F.embedding(input, table, padding_idx)
    s = lam @ hyper_weight.t()
    shape = [1] * input.dim() + [s.shape[1]]
    shape[batch_dim] = s.shape[0]
    return F.embedding(input, weight_elem, padding_idx) + s.view(shape) * F.embedding(input, weight_hyper, padding_idx)
