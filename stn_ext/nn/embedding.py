"""StnEmbedding: nn.Embedding whose table responds to hyperparameters, per embedding dimension."""
import torch
from torch import nn

from stn_ext import functional
from stn_ext.nn._base import _StnMixin
from stn_ext.nn._context import ELEMENTARY, _resolve_lam


class StnEmbedding(_StnMixin, nn.Module):
    """nn.Embedding whose table responds to hyperparameters, as the STN paper's language model (the official
    code's HyperEmbedding): a token's vector is e + (V lam) (.) h, with e, h its rows of ``weight_elem`` and
    ``weight_hyper`` (nn.Embedding's layout, (num_embeddings, embedding_dim), so a decoder can be tied to
    weight_elem) and ``hyper_weight`` V of shape (embedding_dim, n_hyper): the table W_e + W_h (.)col (V lam)
    is scaled per embedding dimension (``gate_dim = 1``). No bias. V = 0 at the start: a fresh or converted
    layer computes exactly nn.Embedding.

    ``forward(input, lam=None)``: integer indices of any shape; lam (n_hyper,) shared by the batch, or
    (B, n_hyper) per example where B = input.shape[batch_dim] (0 by default, as the other layers; 1 for a
    time-major (T, B) batch of a language model). Either way two row look-ups and one fused multiply-add over
    the looked-up rows, never the whole table."""

    gate_dim = 1

    def __init__(self, num_embeddings, embedding_dim, n_hyper, padding_idx=None, scale_grad_by_freq=False,
                 sparse=False, batch_dim=0, device=None, dtype=None):
        super().__init__()
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"stn_ext: StnEmbedding: padding_idx={padding_idx} must be within num_embeddings="
                                 f"{num_embeddings}")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.scale_grad_by_freq, self.sparse = padding_idx, scale_grad_by_freq, sparse
        self.batch_dim = batch_dim
        self._make_params((num_embeddings, embedding_dim), embedding_dim, n_hyper, False,
                          dict(device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        """Both tables N(0, 1) as nn.Embedding's, the padding row zero; V zero."""
        with torch.no_grad():
            for w in (self.weight_elem, self.weight_hyper):
                nn.init.normal_(w)
                if self.padding_idx is not None:
                    w[self.padding_idx].zero_()
            self.hyper_weight.zero_()

    @classmethod
    def from_embedding(cls, embedding, n_hyper, batch_dim=0):
        """An StnEmbedding computing what ``embedding`` does (V = 0), with its table (W_h keeps its own init)."""
        if embedding.max_norm is not None:
            raise ValueError("stn_ext: StnEmbedding.from_embedding: max_norm is not supported (it renormalises the "
                             "table in place at each look-up, which has no one meaning for a gated table)")
        w = embedding.weight
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, n_hyper, embedding.padding_idx,
                    embedding.scale_grad_by_freq, embedding.sparse, batch_dim, device=w.device, dtype=w.dtype)
        layer._copy_elementary(w, None)
        return layer

    def forward(self, input, lam=None):
        lam = _resolve_lam(self, lam)
        return functional.stn_embedding(input, None if lam is ELEMENTARY else lam, self.weight_elem,
                                        self.weight_hyper, self.hyper_weight, self.padding_idx,
                                        self.scale_grad_by_freq, self.sparse, self.batch_dim)

    def extra_repr(self):
        s = f"{self.num_embeddings}, {self.embedding_dim}, n_hyper={self.n_hyper}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.batch_dim:
            s += f", batch_dim={self.batch_dim}"
        return s
