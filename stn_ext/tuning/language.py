"""Language models in the trainer (the STN paper's LSTM experiment): token streams cut into BPTT windows, the
hidden state carried from one window to the next, and a self-tuning LSTM language model with the paper's seven
regularisers.

Data. A split's token ids are cut into ``B`` streams (B = the batch size), each stream into windows of ``bptt``
tokens; row ``k * B + b`` of the split is window k of stream b (inputs x, next tokens y), so the trainer's batch
k (its rows in order, unshuffled) continues batch k - 1 in every stream. The tokens past the last whole window
of a stream are left out (at most B * bptt per split).

State. Each use of a split carries its own hidden state in a ``Stream``: the training batches, the hyper steps'
validation batches and each evaluation (which starts from zero), so no state leaks from one to another. A step
may run the model more than once on its batch (Delta-STN's general and response steps, a roll-back): every run
starts from the stream's state at the batch's start, and the trainer moves the stream on once the step is done.

Model (``LanguageModel``, the built-in ``--model lstm``): StnEmbedding -> locked dropout 'in' -> StnLSTM layers
with locked dropout 'h<k>' between them -> locked dropout 'out' -> a decoder tied to the embedding's elementary
table. Its regularisers, as hyperparameters: the dropout slots (one rate per example, one mask per sequence),
``embed_dropout`` (whole words dropped from the table), ``dropconnect`` (on the LSTMs' hidden-to-hidden
weights), ``ar`` and ``tar`` (activation and temporal activation regularisation, loss terms); the last four one
value per batch.
"""
import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from stn_ext.data import Dataset, Split
from stn_ext.nn import StnEmbedding, StnLSTM
from stn_ext.tuning import models
from stn_ext.tuning.augment import dropout_mask
from stn_ext.tuning.space import LANGUAGE_KINDS

TEXT_DATA = ("austen", "ptb")  # built-in corpora (stn_ext.corpus)
DEFAULTS = {"lr": 20.0, "momentum": 0.0, "clip": 0.25, "bptt": 35}  # a language model's (AWD-LSTM's plain SGD)


# --- data ----------------------------------------------------------------------------------------------

def stream_split(ids, n_streams, bptt):
    """A Split of BPTT windows of ``n_streams`` streams of the 1-D token ids (see the module's doc): the streams
    of corpus.batchify, whole windows only."""
    from stn_ext.corpus import batchify

    cols = batchify(torch.as_tensor(ids, dtype=torch.long).reshape(-1), n_streams)  # (T, B)
    windows = (cols.shape[0] - 1) // bptt
    if windows < 1:
        raise ValueError(f"stn_ext: {cols.numel()} tokens cannot fill {n_streams} streams of one {bptt}-token window "
                         "each (and its next token); use a smaller batch size or bptt")
    span = windows * bptt
    cut = lambda t: t.reshape(windows, bptt, n_streams).transpose(1, 2).reshape(windows * n_streams, bptt)  # noqa: E731
    return Split(cut(cols[:span]).contiguous(), cut(cols[1:span + 1]).contiguous())


def text_dataset(train, val, test, vocab_size, batch_size, bptt, name="text"):
    """A language-modelling Dataset (task 'language', n_classes = vocab_size) from three 1-D id tensors."""
    for which, ids in (("train", train), ("val", val), ("test", test)):
        ids = torch.as_tensor(ids)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"stn_ext: the {which} split holds token ids outside [0, {vocab_size})")
    splits = [stream_split(ids, batch_size, bptt) for ids in (train, val, test)]
    return Dataset(*splits, task="language", n_classes=vocab_size, name=name)


def load_text(name, batch_size, bptt, path=None, train_tokens=0, eval_tokens=0):
    """A built-in corpus (TEXT_DATA: stn_ext.corpus) as a language-modelling Dataset; ``train_tokens`` > 0: the
    first that many tokens of the training split only (the vocabulary stays the whole split's); ``eval_tokens``
    > 0: likewise of the validation and test splits (quick versions of a benchmark)."""
    from stn_ext import corpus

    c = corpus.load_corpus(name, path=path or None)
    cap = lambda ids, n: ids[:n] if n else ids  # noqa: E731
    return text_dataset(cap(c.train, train_tokens), cap(c.val, eval_tokens), cap(c.test, eval_tokens), len(c.vocab),
                        batch_size, bptt, name=name)


def token_losses(logits, y):
    """Per-window mean cross-entropy (B,) of logits (B, T, V) against next tokens y (B, T): their mean over a
    split of whole windows is the per-token loss, whose exp is the perplexity."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


# --- the hidden state carried along a split's streams ------------------------------------------------

class Stream:
    """The hidden state of a split's streams at the start of the current batch (``start``) and after the
    model's last run on it (``end``); None: zero."""

    def __init__(self):
        self.start = self.end = None

    def advance(self):
        self.start = self.end

    def reset(self):
        self.start = self.end = None


_STREAM = contextvars.ContextVar("stn_ext_stream", default=None)


@contextlib.contextmanager
def carrying(stream):
    """Within this block a LanguageModel starts from ``stream.start`` and leaves its final state in
    ``stream.end`` (detached: truncated backpropagation through time)."""
    token = _STREAM.set(stream)
    try:
        yield stream
    finally:
        _STREAM.reset(token)


# --- the model -----------------------------------------------------------------------------------------

class LockedDropout(models.HyperDropout):
    """Variational dropout of (B, T, H) sequences: one mask per sequence, shared by its time steps; the rate
    per example, as HyperDropout's."""

    def mask(self, x):
        return super().mask(x[:, :1])


def _one(value):
    """One value for the batch of a per-batch hyperparameter ((B,) equal entries, or 0-d)."""
    return value.reshape(-1)[0] if value.dim() else value


class LanguageModel(nn.Module):
    """An LSTM language model of STN layers (the module's doc): ``hidden`` the LSTM layers' sizes; the embedding
    has the last one's size so the decoder can be tied to it. forward(x (B, T) ids) -> logits (B, T, vocab)."""

    hyper_kinds = LANGUAGE_KINDS

    def __init__(self, vocab_size, n_hyper, hidden=(200, 200), tie=True):
        super().__init__()
        if not hidden:
            raise ValueError("stn_ext: a language model needs at least one LSTM layer (hidden)")
        emb = hidden[-1] if tie else hidden[0]
        self.embedding = StnEmbedding(vocab_size, emb, n_hyper)
        self.drop_in = LockedDropout("in")
        sizes = (emb,) + tuple(hidden)
        self.lstms = nn.ModuleList(StnLSTM(sizes[k], sizes[k + 1], n_hyper, batch_first=True)
                                   for k in range(len(hidden)))
        self.drops = nn.ModuleList(LockedDropout(f"h{k}") for k in range(1, len(hidden)))
        self.drop_out = LockedDropout("out")
        self.decoder = nn.Linear(hidden[-1], vocab_size)
        with torch.no_grad():  # AWD-LSTM's initialisation of the table and the decoder's bias
            self.embedding.weight_elem.uniform_(-0.1, 0.1)
            self.decoder.bias.zero_()
        if tie:
            self.decoder.weight = self.embedding.weight_elem

    def _masks(self, vals, rnd):
        """Embedding dropout's mask over the vocabulary and DropConnect's per LSTM (None where not tuned)."""
        words, hh = None, [None] * len(self.lstms)
        if not self.training or rnd is None:
            return words, hh
        device, dtype = self.decoder.weight.device, self.decoder.weight.dtype
        if "embed_dropout" in vals:
            p = _one(vals["embed_dropout"]).clamp(0, 0.999)
            words = (rnd.shared_rand(self.embedding.num_embeddings, device=device, dtype=dtype) >= p) / (1 - p)
        if "dropconnect" in vals:
            p = _one(vals["dropconnect"]).clamp(0, 0.999)
            hh = [(rnd.shared_rand(4 * m.hidden_size, m.hidden_size, device=device, dtype=dtype) >= p) / (1 - p)
                  for m in self.lstms]
        return words, hh

    def forward(self, x):
        # this model's own regularisers (their names are their kinds), during training steps only
        kinds = {k: v for k, v in (models.current_hyperparameters() or {}).items() if k in LANGUAGE_KINDS}
        words, hh = self._masks(kinds, models.current_random())
        stream = _STREAM.get()
        start = stream.start if stream is not None else None
        side = models.current_side_run()
        if side is not None:  # from its rows' state; what is carried on stays the step's own run's
            stream = None
            start = None if start is None else [(h[:, side.to(h.device)], c[:, side.to(c.device)]) for h, c in start]
        if start is not None and start[0][0].shape[1] != x.shape[0]:
            raise ValueError(f"stn_ext: the carried hidden state is for {start[0][0].shape[1]} streams, the batch "
                             f"has {x.shape[0]}")
        out = self.embedding(x)
        if words is not None:
            out = out * words[x].unsqueeze(-1)
        out = self.drop_in(out)
        state = []
        for k, lstm in enumerate(self.lstms):
            out, (h, c) = lstm(out, None if start is None else start[k], weight_hh_mask=hh[k])
            state.append((h.detach(), c.detach()))
            if k < len(self.drops):
                out = self.drops[k](out)
        if stream is not None:
            stream.end = state
        dropped = self.drop_out(out)
        if self.training:
            if "ar" in kinds:
                models.add_penalty(_one(kinds["ar"]) * dropped.pow(2).mean((1, 2)))
            if "tar" in kinds:
                models.add_penalty(_one(kinds["tar"]) * (out[:, 1:] - out[:, :-1]).pow(2).mean((1, 2)))
        return self.decoder(dropped)


def check_model_for_data(model, text, data):
    """Refuse a built-in model on data of the other kind: 'lstm' is for text, the others for images and features."""
    if text != (model == "lstm"):
        raise ValueError(f"stn_ext: model 'lstm' is for text (--data {' or '.join(TEXT_DATA)}), the others for "
                         f"images and features; got model {model!r} on {data!r}")


def dropout_slots(hidden):
    """The dropout slots of LanguageModel(hidden=...)."""
    return ["in"] + [f"h{k}" for k in range(1, len(hidden))] + ["out"]


__all__ = ["TEXT_DATA", "DEFAULTS", "stream_split", "text_dataset", "load_text", "token_losses", "Stream",
           "carrying", "LockedDropout", "LanguageModel", "check_model_for_data", "dropout_slots"]
