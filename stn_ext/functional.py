"""Functional STN layers. Linear and conv2d are one call into the layer ops of csrc/stn_layers.cpp, which
check the arguments and compose the fused ops in C++:

shared lam (n,):        W(lam) by the fused gate op, then one GEMM/conv.
per-example lam (B, n): one GEMM/conv against the stacked weight [W_e; W_h], then the fused epilogue
                        y = e + s (.) h + offset with s = lam V^T and offset = b_e + (lam C^T) (.) b_h.
                        Never B weights.

The LSTM and the embedding compose the same ops here, in Python (stn_lstm, stn_embedding below).
"""
import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import _VF
from torch.nn.modules.utils import _pair

from stn_ext import _recurrence, ops, reference

_ops = ops._ops


def _needs_reference():
    """The fused ops have reverse-mode autograd only: under torch.func transforms (grad, vmap, jvp,
    jacrev, ...) and forward-mode AD the same maths runs as plain PyTorch ops (stn_ext.reference)."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def _stand_in(t):
    """A tensor of t's shape, dtype and device that holds one element: what the argument checks read."""
    return None if t is None else torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape)


def _check_for_reference(kind, args, groups=1):
    """The fused layer's argument checks (csrc/stn_layers.cpp) before the reference path: on stand-ins,
    since the op has no batching rule (it returns nothing) and reads only shapes, dtypes and devices."""
    _ops.check_layer_args(kind, *(_stand_in(t) for t in args), groups)


def stn_linear(x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem=None, bias_hyper=None, hyper_bias=None):
    """Self-tuning linear layer; x: (B, *, in), lam: (n_hyper,) or (B, n_hyper)."""
    args = (x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem, bias_hyper, hyper_bias)
    if _needs_reference():
        _check_for_reference("stn_linear", args)
        return reference.stn_linear(*args)
    return _ops.stn_linear(*args)


def stn_conv2d(x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem=None, bias_hyper=None, hyper_bias=None,
               stride=1, padding=0, dilation=1, groups=1):
    """Self-tuning conv2d; x: (B, C, H, W) in any memory format, lam: (n_hyper,) or (B, n_hyper); padding:
    numbers, or 'same' / 'valid' as F.conv2d takes them."""
    args = (x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem, bias_hyper, hyper_bias)
    if _needs_reference():
        _check_for_reference("stn_conv2d", args, groups)
        return reference.stn_conv2d(*args, stride, padding, dilation, groups)
    stride, dilation = _pair(stride), _pair(dilation)  # the op's int[2] takes no bare int from Python
    if isinstance(padding, str):
        return _ops.stn_conv2d(*args, stride, (0, 0), dilation, groups, padding)
    return _ops.stn_conv2d(*args, stride, _pair(padding), dilation, groups)


# --- LSTM and embedding ---------------------------------------------------------------------------


def _autocast_on(device):
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def _fail(kind, message):
    raise ValueError(f"stn_ext: {kind}: {message}")


def _shape(t):
    return str(tuple(t.shape))


def _check_like(kind, name, t, weight):
    """t on weight_elem's device, and of its dtype unless autocast is on (the wording of csrc/stn_layers.cpp)."""
    if t.device != weight.device:
        _fail(kind, f"{name} is on {t.device} but weight_elem is on {weight.device}; move them to one device")
    if not _autocast_on(weight.device) and t.dtype != weight.dtype:
        _fail(kind, f"{name} has dtype {t.dtype} but weight_elem has {weight.dtype}; cast them to one dtype")


def _check_lam(kind, lam, weight, n_hyper, batch, x_name, x):
    """lam (n_hyper,) or (B, n_hyper) with B = batch, as the fused layers check it; None (elementary) passes."""
    if lam is None:
        return
    if not isinstance(lam, torch.Tensor):
        raise TypeError(f"stn_ext: {kind}: lam must be a tensor, got {type(lam).__name__}")
    if lam.device != weight.device:
        _fail(kind, f"lam is on {lam.device} but weight_elem is on {weight.device}; move them to one device")
    if not lam.is_floating_point():
        _fail(kind, f"lam must be a floating-point tensor, got {lam.dtype}")
    _check_like(kind, "lam", lam, weight)
    if lam.dim() == 1:
        if lam.shape[0] != n_hyper:
            _fail(kind, f"lam has shape {_shape(lam)} but the layer has n_hyper={n_hyper}")
    elif lam.dim() == 2:
        if lam.shape[1] != n_hyper:
            _fail(kind, f"lam has shape {_shape(lam)}; expected (B, n_hyper={n_hyper})")
        if batch is None or lam.shape[0] != batch:
            _fail(kind, f"per-example lam has batch size {lam.shape[0]} (shape[0]) but {x_name} has batch size "
                        f"{'none' if batch is None else batch} ({x_name}.shape={_shape(x)})")
    else:
        _fail(kind, f"lam must have shape (n_hyper,) or (B, n_hyper), got {_shape(lam)}")


def _layer_masks(kind, weight_hh_mask, n_layers):
    if weight_hh_mask is None or isinstance(weight_hh_mask, torch.Tensor):
        return [weight_hh_mask] * n_layers
    masks = list(weight_hh_mask)
    if len(masks) != n_layers:
        _fail(kind, f"weight_hh_mask must be one tensor or one per layer ({n_layers}), got {len(masks)}")
    return masks


def _check_lstm(input, hx, lam, params, batch_first, packed):
    kind = "stn_lstm"
    if not params:
        _fail(kind, "params must hold one (ih, hh) pair per layer, got none")
    w0 = params[0][0][0]
    hidden, n_hyper, n_layers = params[0][1][0].shape[1], params[0][0][2].shape[1], len(params)
    has_bias = params[0][0][3] is not None
    for layer, (ih, hh) in enumerate(params):
        for name, p, cols in (("ih", ih, None), ("hh", hh, hidden)):
            w = p[0]
            if w.dim() != 2 or w.shape[0] != 4 * hidden or (cols is not None and w.shape[1] != cols):
                _fail(kind, f"layer {layer}: {name} weight_elem has shape {_shape(w)}; expected (4*hidden_size="
                            f"{4 * hidden}, {'input features' if cols is None else cols})")
            if (p[3] is not None) != has_bias:
                _fail(kind, f"layer {layer}: {name} has {'no ' if p[3] is None else ''}bias, unlike layer 0's ih")
            if p[2].shape != (4 * hidden, n_hyper) or p[1].shape != w.shape:
                _fail(kind, f"layer {layer}: {name} weight_hyper {_shape(p[1])} or hyper_weight {_shape(p[2])} does "
                            f"not match weight_elem {_shape(w)} and n_hyper={n_hyper}")
    layout = "(B, T, input_size)" if batch_first else "(T, B, input_size)"
    want_dim = 2 if packed else 3
    if input.dim() != want_dim:
        _fail(kind, f"input must be {'the (N, input_size) data of a packed sequence' if packed else layout}, "
                    f"got shape {_shape(input)}")
    if input.shape[-1] != w0.shape[1]:
        _fail(kind, f"input has shape {_shape(input)} but the layer has input_size={w0.shape[1]}")
    _check_like(kind, "input", input, w0)
    batch = None if packed else input.shape[0 if batch_first else 1]
    if hx is not None:
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"stn_ext: {kind}: hx must be a pair (h0, c0), got {type(hx).__name__}")
        for name, t in zip(("h0", "c0"), hx):
            if t.dim() != 3 or t.shape[0] != n_layers or t.shape[2] != hidden or (batch is not None and t.shape[1] != batch):
                _fail(kind, f"{name} has shape {_shape(t)}; expected (num_layers={n_layers}, "
                            f"B={'B' if batch is None else batch}, hidden_size={hidden})")
            _check_like(kind, name, t, w0)
    _check_lam(kind, lam, w0, n_hyper, batch, "input", input)
    return has_bias, hidden


def _gated(p, lam):
    """The weight and bias of one STN weight at a shared lam (by the fused gate op), or W_e, b_e (lam None)."""
    w_e, w_h, v, b_e, b_h, c = p
    if lam is None:
        return w_e, b_e
    if _needs_reference():
        return reference.gated_weight(lam, w_e, w_h, v), reference.gated_bias(lam, b_e, b_h, c)
    w = ops.gate(w_e, w_h, torch.mv(v, lam).to(w_e.dtype))  # mv runs in a lower precision under CUDA autocast
    b = b_e if b_e is None or b_h is None else ops.gate(b_e, b_h, torch.mv(c, lam).to(b_e.dtype))
    return w, b


def _one_buffer(weights):
    """The weights as views of one new buffer, in nn.LSTM's order (what its flatten_parameters lays out for
    cuDNN). cuDNN handed separate tensors copies them into one at every call and warns; this is that copy."""
    flat = torch.cat([w.reshape(-1) for w in weights])
    return [part.view(w.shape) for part, w in zip(flat.split([w.numel() for w in weights]), weights)]


@torch.compiler.disable
def _eager_lstm(*args):
    return _VF.lstm(*args)


def _lstm_kernel(*args):
    """torch's LSTM kernel. Under torch.compile it runs eagerly (a graph break; the gate ops before it are
    compiled) unless torch._dynamo.config.allow_rnn is set: Dynamo's rule for nn.LSTM. (On torch 2.14's CPU,
    AOTAutograd fails on the kernel's backward for nn.LSTM and this layer alike.)"""
    if torch.compiler.is_compiling() and not torch._dynamo.config.allow_rnn:
        return _eager_lstm(*args)
    return _VF.lstm(*args)


def _per_example_bias(lam, p):
    b_e, b_h, c = p[3], p[4], p[5]
    return b_e if b_h is None else torch.addmm(b_e, lam, (c * b_h.unsqueeze(1)).t())


def _lstm_per_example(input, hx, lam, params, has_bias, dropout, training, batch_first, masks):
    """Per-example lam: the input-to-hidden term of all steps at once (one per-example linear op over (B, T)),
    then per step one per-example linear op against [W_hh,e; W_hh,h] whose offset is that step's input term
    (stn_ext/_recurrence.py)."""
    x = input if batch_first else input.transpose(0, 1)  # (B, T, in)
    h_n, c_n = [], []
    for layer, ((ih, hh), mask) in enumerate(zip(params, masks)):
        if layer > 0 and dropout > 0 and training:
            x = F.dropout(x, dropout, True)
        offset = _per_example_bias(lam, ih) + _per_example_bias(lam, hh) if has_bias else None
        pre = ops.per_example_linear(x, ih[0], ih[1], lam @ ih[2].t(), offset)  # (B, T, 4H), both biases in
        w_e, w_h = hh[0], hh[1]
        if mask is not None:  # masked once, into one storage: the op reads [W_e; W_h] without a copy per step
            w_e, w_h = (torch.stack([w_e, w_h]) * mask).unbind(0)
        # The loop over time as one autograd node (its weight gradient one GEMM over all steps); under autocast
        # the steps are left to autograd (the ops cast at the autocast key).
        run = _recurrence.recurrence_by_steps if _autocast_on(x.device) else _recurrence.recurrence
        x, h, c = run(pre, hx[0][layer], hx[1][layer], w_e, w_h, lam @ hh[2].t())
        h_n.append(h)
        c_n.append(c)
    return (x if batch_first else x.transpose(0, 1)), (torch.stack(h_n), torch.stack(c_n))


def stn_lstm(input, hx, lam, params, dropout=0.0, training=False, batch_first=False, weight_hh_mask=None,
             batch_sizes=None):
    """Self-tuning multi-layer LSTM (nn.LSTM's maths and gate order i, f, g, o) whose every input-to-hidden
    and hidden-to-hidden weight is an STN weight W_e + (V lam) (.)row W_h, its bias b_e + (C lam) (.) b_h.

    input           (T, B, input_size), or (B, T, input_size) with batch_first; with batch_sizes, the data of a
                    PackedSequence (shared lam only)
    hx              (h0, c0), each (num_layers, B, hidden_size), or None for zeros
    lam             (n_hyper,) shared by the batch: each gated weight is formed once by the fused gate op and
                    torch's own LSTM kernel runs on them (cuDNN on a GPU); (B, n_hyper) per example: the
                    hypernet term inside the recurrence (a loop over time); None: the elementary weights alone
    params          one (ih, hh) pair per layer, each the six tensors of an STN weight with 4*hidden_size rows
                    (weight_elem, weight_hyper, hyper_weight, bias_elem, bias_hyper, hyper_bias; the last three
                    None without bias)
    weight_hh_mask  DropConnect: a tensor that multiplies every layer's gated hidden-to-hidden weight
                    (broadcast to (4*hidden_size, hidden_size); scale it by 1/(1-p) yourself), or a sequence
                    of one (or None) per layer
    Returns output ((T, B, hidden_size) or batch first), (h_n, c_n)."""
    per_example = isinstance(lam, torch.Tensor) and lam.dim() == 2
    if batch_sizes is not None and (per_example or _needs_reference()):
        raise NotImplementedError("stn_ext: stn_lstm: a PackedSequence needs one lam for the batch (and no "
                                  "torch.func transform); pad the batch instead")
    has_bias, hidden = _check_lstm(input, hx, lam, params, batch_first, batch_sizes is not None)
    masks = _layer_masks("stn_lstm", weight_hh_mask, len(params))
    if hx is None:
        batch = int(batch_sizes[0]) if batch_sizes is not None else input.shape[0 if batch_first else 1]
        zeros = input.new_zeros(len(params), batch, hidden)
        hx = (zeros, zeros)
    if _needs_reference() or per_example:
        if _needs_reference():
            return reference.stn_lstm(input, hx, lam, params, dropout, training, batch_first, weight_hh_mask)
        return _lstm_per_example(input, hx, lam, params, has_bias, float(dropout), training, batch_first, masks)
    weights = []
    for (ih, hh), mask in zip(params, masks):
        w_ih, b_ih = _gated(ih, lam)
        w_hh, b_hh = _gated(hh, lam)
        if mask is not None:
            w_hh = w_hh * mask
        weights += [w_ih, w_hh] + ([b_ih, b_hh] if has_bias else [])
    if input.is_cuda:
        weights = _one_buffer(weights)
    args = (tuple(hx), weights, has_bias, len(params), float(dropout), training, False)
    if batch_sizes is None:
        output, h_n, c_n = _lstm_kernel(input, *args, batch_first)
    else:
        output, h_n, c_n = _lstm_kernel(input, batch_sizes, *args)
    return output, (h_n, c_n)


def stn_embedding(input, lam, weight_elem, weight_hyper, hyper_weight, padding_idx=None, scale_grad_by_freq=False,
                  sparse=False, batch_dim=0):
    """Self-tuning embedding, the official STN code's HyperEmbedding: the looked-up rows of the two tables
    (num_embeddings, embedding_dim) combined as e + s (.) h, s = V lam per embedding dimension (V of shape
    (embedding_dim, n_hyper)); the table W_e + W_h (.)col (V lam) is never formed. input: integer indices of
    any shape; lam (n_hyper,), (B, n_hyper) per example with B = input.shape[batch_dim], or None (W_e alone)."""
    kind = "stn_embedding"
    if input.dtype not in (torch.int64, torch.int32):
        _fail(kind, f"input must be integer indices (torch.int64 or torch.int32), got {input.dtype}")
    w = weight_elem
    if w.dim() != 2 or weight_hyper.shape != w.shape or hyper_weight.dim() != 2 or hyper_weight.shape[0] != w.shape[1]:
        _fail(kind, f"weight_elem {_shape(w)} and weight_hyper {_shape(weight_hyper)} must be (num_embeddings, "
                    f"embedding_dim) and hyper_weight {_shape(hyper_weight)} (embedding_dim, n_hyper)")
    _check_lam(kind, lam, w, hyper_weight.shape[1], input.shape[batch_dim] if input.dim() > batch_dim else None,
               "input", input)

    def lookup(table):
        return F.embedding(input, table, padding_idx, None, 2.0, scale_grad_by_freq, sparse)

    e = lookup(w)
    if lam is None:
        return e
    if lam.dim() == 1:
        s = torch.mv(hyper_weight, lam)
    else:
        shape = [1] * input.dim() + [w.shape[1]]
        shape[batch_dim] = lam.shape[0]
        s = (lam @ hyper_weight.t()).view(shape)
    return torch.addcmul(e, lookup(weight_hyper), s.to(e.dtype))
