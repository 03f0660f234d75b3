"""Structural pruning of BERT-style sentence encoders (BERT, MPNet): attention heads, MLP neurons, whole layers.

Like the decoder operators (:mod:`recsys_slm.prune.structure`), every operator slices weight tensors (smaller
matrices, fewer parameters, a faster forward; never zero masks) and updates the module attributes the forward
reads. Supported: transformers ``BertModel`` (all-MiniLM-L6-v2) and ``MPNetModel`` (all-mpnet-base-v2), given
bare or as a ``SentenceTransformer`` whose first module holds them (``model[0].auto_model``).

Layer layout (per ``encoder.layer[i]``):

* BERT: ``attention.self.{query,key,value}`` (rows = heads · head_size) → ``attention.output.dense`` (columns);
  ``intermediate.dense`` (rows = neurons) → ``output.dense`` (columns).
* MPNet: ``attention.attn.{q,k,v}`` → ``attention.attn.o``; the same MLP. The relative position bias is one
  ``encoder.relative_attention_bias`` ``Embedding(buckets, n_heads)`` shared by all layers.

**What stock loading can express.** In the installed transformers (5.x), ``BertSelfAttention`` and
``MPNetSelfAttention`` derive the head size as ``hidden_size / num_attention_heads`` and build q/k/v as
``hidden_size → hidden_size``; ``PreTrainedModel.prune_heads`` and the ``config.pruned_heads`` field that v4
re-applied on load were removed in v5. So a stock config cannot describe fewer heads at the original head size:
saving 2 of 4 heads with ``num_attention_heads=2`` reloads with twice the head size and ``from_pretrained``
refuses the checkpoint (size mismatch). Padding kept heads up to the derived size would load, but with q/k/v
back at ``hidden × hidden`` it removes no parameter. Hence:

* :func:`prune_encoder_heads` works in memory (exact; for analysis, e.g. head sensitivity), but
  :func:`sync_encoder_config` and :func:`prune_sentence_encoder` refuse head-pruned models;
* neurons (``intermediate_size``) and layers (``num_hidden_layers``) are expressible: uniformly pruned encoders
  save as ordinary sentence-transformers folders that ``SentenceTransformer(out_dir)`` loads without recsys_slm.

Importance (per layer; see :mod:`recsys_slm.prune.importance` for the decoder versions):

* magnitude: head h ``‖[W_q rows of h ; W_o columns of h]‖_F``; neuron i ``‖[W_in row i ; W_out column i]‖_2``;
* activation (Minitron, arXiv 2407.14679): the attention-output input (per head: the L2 norm of its slice) and
  the ``output.dense`` input (per neuron: ``|x|``) at every real token, aggregated as mean over the sequence then
  L2 over the batch; plus ShortGPT Block Influence per layer (``1 − mean cos(x_in, x_out)``) for depth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from recsys_slm.prune.structure import _slice_linear

Method = Literal["magnitude", "activation"]
SUPPORTED_MODEL_TYPES = ("bert", "mpnet")
# Forward inputs of BertModel / MPNetModel; tokenizers may emit more (e.g. a BERT tokenizer used with MPNet).
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class EncoderWidths:
    """Widths of one encoder layer: attention heads, head size, MLP neurons (read from the tensors)."""

    heads: int
    head_size: int
    intermediate: int


class EncoderScores(NamedTuple):
    """Importance scores: ``heads (L, n_heads)``, ``neurons (L, intermediate)``, ``layers (L,)`` or None."""

    heads: torch.Tensor
    neurons: torch.Tensor
    layers: torch.Tensor | None


# --------------------------------------------------------------------------------------------- architecture


def _sentence_transformer(model: nn.Module) -> Any:
    """``model`` if it is a SentenceTransformer (an ``nn.Sequential`` whose first module has ``auto_model``)."""
    if isinstance(model, nn.Sequential) and len(model) and hasattr(model[0], "auto_model"):
        return model
    return None


def encoder_model(model: nn.Module) -> nn.Module:
    """The transformers encoder inside ``model``: a ``SentenceTransformer``'s ``model[0].auto_model``, a task
    model's ``base_model`` (e.g. ``BertForMaskedLM.bert``), or ``model`` itself.

    Raises:
        ValueError: the model is not a BERT or MPNet encoder (the message names its class and ``model_type``).
    """
    st = _sentence_transformer(model)
    inner = st[0].auto_model if st is not None else model
    inner = getattr(inner, "base_model", inner)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    encoder = getattr(inner, "encoder", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not isinstance(
        getattr(encoder, "layer", None), nn.ModuleList
    ):
        raise ValueError(
            f"{type(inner).__name__} (model_type={model_type!r}) is not supported by the encoder pruning operators; "
            f"supported: BertModel and MPNetModel (model_type {', '.join(SUPPORTED_MODEL_TYPES)}), bare or inside "
            "a SentenceTransformer"
        )
    return inner


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The layer list ``encoder.layer`` of a BERT / MPNet encoder (or of the one inside a SentenceTransformer).

    Raises:
        ValueError: unsupported architecture (names the class).
    """
    return encoder_model(model).encoder.layer


def _attention_parts(layer: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    """(self-attention module holding q/k/v, module holding the output projection, its attribute name)."""
    attention = getattr(layer, "attention", None)
    # BERT: q/k/v in BertSelfAttention (attention.self), the output projection in BertSelfOutput.
    if hasattr(attention, "self") and hasattr(attention, "output"):
        return attention.self, attention.output, "dense"
    if hasattr(attention, "attn"):  # MPNet: q/k/v and o live in one MPNetSelfAttention
        return attention.attn, attention.attn, "o"
    raise ValueError(
        f"{type(layer).__name__} is not a BERT or MPNet layer (no attention.self/attention.output or attention.attn)"
    )


def _qkv(attn: nn.Module) -> tuple[str, str, str]:
    return ("query", "key", "value") if hasattr(attn, "query") else ("q", "k", "v")


def layer_widths(layer: nn.Module) -> EncoderWidths:
    """Widths of one encoder layer, from its tensors (``heads = q rows / attention_head_size``)."""
    attn, _, _ = _attention_parts(layer)
    head_size = int(attn.attention_head_size)
    q = getattr(attn, _qkv(attn)[0])
    return EncoderWidths(q.out_features // head_size, head_size, layer.intermediate.dense.out_features)


def encoder_widths(model: nn.Module) -> list[EncoderWidths]:
    """Per-layer widths of a BERT / MPNet encoder."""
    return [layer_widths(layer) for layer in encoder_layers(model)]


def _check_keep(keep: Iterable[int], total: int, what: str) -> list[int]:
    """Sorted distinct indices in [0, total), at least one; ValueError naming ``what`` otherwise."""
    index = sorted(int(i) for i in keep)
    if not index:
        raise ValueError(f"cannot keep 0 {what}: keep at least one of {total}")
    if len(set(index)) != len(index) or index[0] < 0 or index[-1] >= total:
        bad = sorted({i for i in index if not 0 <= i < total} | {i for i in index if index.count(i) > 1})
        raise ValueError(
            f"kept {what} must be distinct indices in [0, {total}); got {bad} out of range or repeated"
        )
    return index


# ------------------------------------------------------------------------------------------------ operators


def prune_encoder_heads(layer: nn.Module, keep_heads: Sequence[int]) -> None:
    """Keep the attention heads ``keep_heads`` of one BERT / MPNet layer, in place.

    q/k/v lose the rows of removed heads (``(n·d, H) → (k·d, H)`` weights, ``(k·d,)`` biases), the output
    projection loses the matching columns (``(H, n·d) → (H, k·d)``); ``num_attention_heads`` and
    ``all_head_size`` are updated, the head size ``d`` (and so the softmax scaling) stays. Exact: the output
    equals the unpruned layer's with the removed heads' output-projection columns zeroed.

    MPNet adds one relative position bias ``(B, n_heads, S, S)``, computed once by the encoder for all layers;
    a forward pre-hook on the pruned layer's attention selects its kept heads from it (the bias table is
    shared, so it cannot be sliced per layer). Repeated pruning composes (indices are relative to the current
    heads).

    A head-pruned encoder cannot be saved for stock loading (see the module docstring); use it in memory.

    Raises:
        ValueError: no head kept, an index out of range or repeated, or not a BERT / MPNet layer.
    """
    attn, out_module, out_name = _attention_parts(layer)
    widths = layer_widths(layer)
    keep = _check_keep(keep_heads, widths.heads, "attention heads")
    d = widths.head_size
    index = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])
    for name in _qkv(attn):
        setattr(attn, name, _slice_linear(getattr(attn, name), index, 0))
    setattr(out_module, out_name, _slice_linear(getattr(out_module, out_name), index, 1))
    # The forward reshapes q/k/v with view(..., -1, attention_head_size) and the output with all_head_size.
    attn.num_attention_heads = len(keep)
    attn.all_head_size = len(keep) * d
    if out_name == "o":  # MPNet: remember which of the encoder's bias heads this layer still has
        previous = getattr(attn, "recsys_slm_kept_heads", list(range(widths.heads)))
        attn.recsys_slm_kept_heads = [previous[h] for h in keep]
        if getattr(attn, "_recsys_slm_bias_hook", None) is None:
            attn._recsys_slm_bias_hook = attn.register_forward_pre_hook(_select_bias_heads, with_kwargs=True)


def _select_bias_heads(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """MPNetSelfAttention pre-hook: position_bias (B, n_heads, S, S) → (B, kept, S, S) of this layer's heads."""
    index = torch.as_tensor(module.recsys_slm_kept_heads, dtype=torch.long)
    if len(args) > 2 and args[2] is not None:  # MPNetAttention passes (hidden, mask, position_bias)
        args = (*args[:2], args[2].index_select(1, index.to(args[2].device)), *args[3:])
    elif kwargs.get("position_bias") is not None:
        bias = kwargs["position_bias"]
        kwargs = {**kwargs, "position_bias": bias.index_select(1, index.to(bias.device))}
    return args, kwargs


def prune_encoder_neurons(layer: nn.Module, keep: Sequence[int]) -> None:
    """Keep the MLP neurons ``keep`` of one BERT / MPNet layer, in place.

    ``intermediate.dense`` keeps rows (``(I, H) → (k, H)`` weight, ``(k,)`` bias), ``output.dense`` the matching
    columns (``(H, I) → (H, k)``). Exact: equals zeroing the removed neurons' ``output.dense`` columns.

    Raises:
        ValueError: no neuron kept, or an index out of range or repeated.
    """
    width = layer.intermediate.dense.out_features
    index = torch.as_tensor(_check_keep(keep, width, "MLP neurons"), dtype=torch.long)
    layer.intermediate.dense = _slice_linear(layer.intermediate.dense, index, 0)
    layer.output.dense = _slice_linear(layer.output.dense, index, 1)


def keep_encoder_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep only the encoder layers ``keep`` (in their original order), in place; returns ``model``.

    Updates ``config.num_hidden_layers`` and any ``layer_idx`` attribute (BERT's attention keeps one for caches).
    MPNet's relative position bias is encoder-level and shared, so it is unaffected.

    Raises:
        ValueError: no layer kept, an index out of range or repeated, or an unsupported model.
    """
    inner = encoder_model(model)
    layers = inner.encoder.layer
    index = _check_keep(keep, len(layers), "encoder layers")
    inner.encoder.layer = nn.ModuleList([layers[i] for i in index])
    inner.config.num_hidden_layers = len(index)
    for new_index, layer in enumerate(inner.encoder.layer):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return model


def sync_encoder_config(model: nn.Module) -> EncoderWidths:
    """Write the (uniform) layer widths into the encoder's config so ``save_pretrained`` round-trips stock.

    Sets ``intermediate_size`` and ``num_hidden_layers``; ``num_attention_heads`` must still be the config's
    (heads · head size = hidden size), since stock BERT / MPNet cannot express removed heads.

    Raises:
        ValueError: layers of different widths (lists them), or heads were removed (explains why stock
            loading cannot express it).
    """
    inner = encoder_model(model)
    widths = encoder_widths(inner)
    distinct = sorted(set(widths), key=str)
    if len(distinct) != 1:
        by = {str(w): [i for i, x in enumerate(widths) if x == w] for w in distinct}
        raise ValueError(f"encoder layers have different widths, which a stock config cannot express: {by}")
    w = distinct[0]
    cfg = inner.config
    if w.heads * w.head_size != cfg.hidden_size:
        raise ValueError(
            f"attention heads were removed ({w.heads} heads of size {w.head_size}, hidden size {cfg.hidden_size}): "
            f"stock {type(inner).__name__} derives head size = hidden_size / num_attention_heads (= "
            f"{cfg.hidden_size // w.heads} for {w.heads} heads) and transformers 5 no longer honours "
            "config.pruned_heads, so the checkpoint would not load; keep every head (prune neurons and layers)"
        )
    cfg.intermediate_size = w.intermediate
    cfg.num_hidden_layers = len(widths)
    return w


def encoder_layer_params(model: nn.Module) -> int:
    """Parameters of the encoder layers (what head / neuron / layer pruning removes; no embeddings, no pooler)."""
    return sum(p.numel() for p in encoder_layers(model).parameters())


# ----------------------------------------------------------------------------------------------- importance


def _stack(rows: list[torch.Tensor], what: str) -> torch.Tensor:
    if len({r.numel() for r in rows}) != 1:
        raise ValueError(
            f"layers have different {what} counts {[r.numel() for r in rows]}; scores need uniform widths"
        )
    return torch.stack(rows)


def encoder_magnitude_scores(model: nn.Module) -> EncoderScores:
    """Weight-norm importance: heads ``(L, n_heads)``, neurons ``(L, intermediate)`` (float32), layers None.

    Head h: ``sqrt(‖W_q[h·d:(h+1)·d, :]‖² + ‖W_o[:, h·d:(h+1)·d]‖²)``; neuron i:
    ``sqrt(‖W_in[i, :]‖² + ‖W_out[:, i]‖²)``. Data-free; layers have no magnitude score (depth pruning then keeps
    evenly spaced layers).
    """
    heads, neurons = [], []
    for layer in encoder_layers(model):
        attn, out_module, out_name = _attention_parts(layer)
        w = layer_widths(layer)
        q = (
            getattr(attn, _qkv(attn)[0]).weight.detach().float().reshape(w.heads, w.head_size, -1)
        )  # (n, d, H)
        o = (
            getattr(out_module, out_name).weight.detach().float().reshape(-1, w.heads, w.head_size)
        )  # (H, n, d)
        heads.append((q.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))).sqrt())
        w_in = layer.intermediate.dense.weight.detach().float()  # (I, H)
        w_out = layer.output.dense.weight.detach().float()  # (H, I)
        neurons.append((w_in.pow(2).sum(1) + w_out.pow(2).sum(0)).sqrt())
    return EncoderScores(_stack(heads, "head"), _stack(neurons, "neuron"), None)


def _token_batches(model: nn.Module, inputs: Sequence[str] | Iterable[Mapping[str, torch.Tensor]],
                   tokenizer: Any, batch_size: int) -> Iterable[Mapping[str, torch.Tensor]]:  # fmt: skip
    """Token batches from texts (tokenized by the SentenceTransformer or ``tokenizer``) or as given."""
    if isinstance(inputs, str):
        raise ValueError("calibration inputs must be a list of texts or of token batches, not one string")
    items = list(inputs)
    if not items:
        raise ValueError("calibration inputs are empty: give at least one text or token batch")
    if not isinstance(items[0], str):
        return items
    st = _sentence_transformer(model)
    preprocess = (
        st.preprocess if st is not None else None
    )  # its tokenizer and max_seq_length, as encode() uses
    if preprocess is None and tokenizer is None:
        raise ValueError("texts need a tokenizer: pass a SentenceTransformer or tokenizer=...")
    batches = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        if preprocess is not None:
            batches.append(preprocess(chunk))
        else:
            batches.append(tokenizer(chunk, padding=True, truncation=True, return_tensors="pt"))
    return batches


def _seq_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S, U) values, (B, S) mask → (B, U) float64 mean over each row's real tokens."""
    values = values.double() * mask[..., None]
    return values.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


@torch.no_grad()
def encoder_activation_scores(model: nn.Module, inputs: Sequence[str] | Iterable[Mapping[str, torch.Tensor]],
                              tokenizer: Any = None, batch_size: int = 16) -> EncoderScores:  # fmt: skip
    """Minitron activation importance and Block Influence over calibration inputs.

    Args:
        model: a ``SentenceTransformer`` (texts are tokenized as it encodes them) or a bare BERT / MPNet model.
        inputs: texts, or token batches (mappings with ``input_ids (B, S)`` and ``attention_mask (B, S)``,
            optionally ``token_type_ids``).
        tokenizer: tokenizes texts for a bare model (called with ``padding=True, truncation=True``).
        batch_size: texts per forward.

    Returns:
        EncoderScores: heads ``(L, n_heads)`` (per head the L2 norm of its ``head_size`` slice of the attention
        output projection's input), neurons ``(L, intermediate)`` (``|x|`` of ``output.dense``'s input), each
        averaged over a row's real tokens, then L2 over rows; layers ``(L,)`` Block Influence
        ``1 − mean_tokens cos(x_in, x_out)``. float64.

    Raises:
        ValueError: empty inputs, texts without a tokenizer, non-uniform widths, or an unsupported model.
    """
    inner = encoder_model(model)
    layers = inner.encoder.layer
    batches = _token_batches(model, inputs, tokenizer, batch_size)
    per_row_heads: list[list[torch.Tensor]] = [[] for _ in layers]  # per layer: (B, n_heads) sequence means
    per_row_neurons: list[list[torch.Tensor]] = [[] for _ in layers]
    bi_sums = torch.zeros(len(layers), dtype=torch.float64)
    state: dict[str, torch.Tensor] = {}

    def hooks(i: int):
        w = layer_widths(layers[i])

        def attn_out_in(module, args):
            x = args[0].float()  # (B, S, n·d): the heads' outputs, concatenated
            norms = x.reshape(*x.shape[:2], w.heads, w.head_size).norm(dim=-1)  # (B, S, n)
            per_row_heads[i].append(_seq_mean(norms, state["mask"]))

        def mlp_out_in(module, args):
            per_row_neurons[i].append(_seq_mean(args[0].float().abs(), state["mask"]))  # (B, S, I) post-GELU

        def block(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (B, S)
            bi_sums[i] += float((cos.double() * state["mask"]).sum())

        return attn_out_in, mlp_out_in, block

    handles = []
    for i, layer in enumerate(layers):
        attn_hook, mlp_hook, block_hook = hooks(i)
        _, out_module, out_name = _attention_parts(layer)
        handles.append(getattr(out_module, out_name).register_forward_pre_hook(attn_hook))
        handles.append(layer.output.dense.register_forward_pre_hook(mlp_hook))
        handles.append(layer.register_forward_hook(block_hook, with_kwargs=True))
    was_training = inner.training
    inner.eval()  # no dropout: the deployed function
    tokens = 0.0
    try:
        device = next(inner.parameters()).device
        for batch in batches:
            feed = {
                k: v.to(device)
                for k, v in batch.items()
                if k in _MODEL_INPUTS and isinstance(v, torch.Tensor)
            }
            mask = feed.get("attention_mask", torch.ones_like(feed["input_ids"]))
            state["mask"] = mask.double()
            tokens += float(mask.sum())
            inner(**feed)
    finally:
        for handle in handles:
            handle.remove()
        inner.train(was_training)
    heads = _stack([torch.cat(rows).pow(2).sum(0).sqrt() for rows in per_row_heads], "head")
    neurons = _stack([torch.cat(rows).pow(2).sum(0).sqrt() for rows in per_row_neurons], "neuron")
    return EncoderScores(heads, neurons, 1.0 - bi_sums / max(tokens, 1.0))


# ------------------------------------------------------------------------------------------ uniform pruning


def _keep_count(fraction: float, total: int, name: str) -> int:
    """``ceil(fraction · total)`` units (at least the fraction is kept); ValueError naming ``name`` if not in (0, 1]."""
    if not 0 < fraction <= 1:
        raise ValueError(f"{name} must be a fraction in (0, 1], got {fraction}")
    return max(1, math.ceil(fraction * total - 1e-9))  # 1e-9: 0.7 · 10 = 7.000000000000001 must keep 7, not 8


def prune_encoder(model: nn.Module, heads_keep: float = 1.0, neurons_keep: float = 1.0, layers_keep: float = 1.0,
                  method: Method = "magnitude", calibration_texts: Sequence[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Prune a BERT / MPNet encoder (bare or in a SentenceTransformer) uniformly, in place, and sync its config.

    Importance is measured once on the unpruned model. Depth: ``ceil(layers_keep · L)`` layers, evenly spaced
    (magnitude; first and last kept, as DistilBERT) or with the highest Block Influence (activation). Width: the
    ``ceil(neurons_keep · I)`` most important neurons of every kept layer. Heads: only ``heads_keep`` that keeps
    every head is accepted (see the module docstring).

    Returns:
        dict: the plan and its effect: ``layers`` (kept indices), ``neurons`` (kept indices per kept layer),
        ``widths``, ``encoder_layer_params`` before/after.

    Raises:
        ValueError: a fraction outside (0, 1], a ``heads_keep`` that removes heads, an unknown method,
            method="activation" without calibration texts, or an unsupported model.
    """
    if method not in ("magnitude", "activation"):
        raise ValueError(f"unknown method {method!r}; choose 'magnitude' or 'activation'")
    inner = encoder_model(model)
    cfg = inner.config
    n_layers, n_heads, width = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    keep_l = _keep_count(layers_keep, n_layers, "layers_keep")
    keep_h = _keep_count(heads_keep, n_heads, "heads_keep")
    keep_n = _keep_count(neurons_keep, width, "neurons_keep")
    if keep_h != n_heads:
        raise ValueError(
            f"heads_keep={heads_keep} would keep {keep_h} of {n_heads} attention heads, which stock "
            f"{type(inner).__name__} cannot load: transformers 5 derives head size = hidden_size / "
            "num_attention_heads and removed config.pruned_heads, so the saved model would not load with "
            "SentenceTransformer(out_dir). Use heads_keep=1.0 and prune neurons and layers"
        )
    if method == "activation":
        if not calibration_texts:
            raise ValueError(
                "method='activation' needs calibration_texts (a list of texts the encoder will embed)"
            )
        scores = encoder_activation_scores(model, calibration_texts)
    else:
        scores = encoder_magnitude_scores(model)

    from recsys_slm.distill.student import select_layers

    if method == "activation":
        kept_layers = select_layers(n_layers, keep_l, "block_influence", scores.layers.tolist())
    else:
        kept_layers = select_layers(n_layers, keep_l, "evenly")
    before = encoder_layer_params(inner)
    keep_encoder_layers(inner, kept_layers)
    kept_neurons = []
    for layer, row in zip(inner.encoder.layer, scores.neurons[kept_layers], strict=True):
        keep = sorted(row.topk(keep_n).indices.tolist())
        if keep_n < row.numel():
            prune_encoder_neurons(layer, keep)
        kept_neurons.append(keep)
    widths = sync_encoder_config(inner)
    return {
        "architecture": type(inner).__name__,
        "method": method,
        "layers": kept_layers,
        "neurons": kept_neurons,
        "widths": {
            "layers": len(kept_layers),
            "heads": widths.heads,
            "head_size": widths.head_size,
            "intermediate": widths.intermediate,
        },  # fmt: skip
        "before": {"layers": n_layers, "heads": n_heads, "intermediate": width},
        "encoder_layer_params": {"before": before, "after": encoder_layer_params(inner)},
    }


@torch.no_grad()
def _embed(model: Any, texts: Sequence[str]) -> torch.Tensor:
    return model.encode(list(texts), convert_to_tensor=True, batch_size=len(texts)).float().cpu()


_CHECK_TEXTS = ("a quiet drama about a family", "space opera with laser battles", "toy story (1995)",
                "an animated comedy for children")  # fmt: skip


def prune_sentence_encoder(src_dir: str | Path, out_dir: str | Path, heads_keep: float = 1.0, neurons_keep: float = 1.0,
                           layers_keep: float = 1.0, method: Method = "magnitude",
                           calibration_texts: Sequence[str] | None = None,
                           device: str | torch.device | None = None, config: dict[str, Any] | None = None,
                           extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Load a sentence-transformers encoder, prune it uniformly (:func:`prune_encoder`), save it atomically.

    The output is a plain sentence-transformers folder (``SentenceTransformer(out_dir)``, with or without
    ``truncate_dim``, loads it without recsys_slm) plus a ``recsys_slm.json`` manifest (stage ``"prune"``).
    Before the folder is published it is reloaded with stock sentence-transformers and its embeddings of a few
    texts compared with the in-memory pruned model; a mismatch above 1e-5 aborts (nothing is written).

    Args:
        src_dir: packaged encoder name, sentence-transformers directory or hub id.
        out_dir: target directory (replaced if recsys_slm wrote it).
        heads_keep / neurons_keep / layers_keep: fractions in (0, 1] kept per layer / of the layers (rounded up).
        method: "magnitude" (data-free) or "activation" (needs ``calibration_texts``).
        calibration_texts: texts for activation importance (e.g. item descriptions the retriever embeds).
        device: where to load and score; None = CUDA if available.
        config: more resolved-config fields for the manifest (e.g. the CLI's config).
        extra: more top-level manifest fields (e.g. the source retriever's texts).

    Returns:
        dict: :func:`prune_encoder`'s report (without the per-layer neuron indices) plus ``out_dir``,
        ``embedding_dim`` and ``reload_max_abs_diff``; also written to the manifest's ``metrics``.
    """
    from recsys_slm.model_dir import atomic_dir, write_manifest
    from recsys_slm.models.loading import load_sentence_encoder

    model = load_sentence_encoder(src_dir, device=device)
    plan = prune_encoder(model, heads_keep, neurons_keep, layers_keep, method, calibration_texts)
    expected = _embed(model, _CHECK_TEXTS)
    report = {
        k: v for k, v in plan.items() if k != "neurons"
    }  # indices: up to L × 3072 ints, kept out of JSON
    report["embedding_dim"] = int(expected.shape[1])
    config = {"heads_keep": heads_keep, "neurons_keep": neurons_keep, "layers_keep": layers_keep, "method": method,
              "calibration_texts": len(calibration_texts or []), **(config or {})}  # fmt: skip
    with atomic_dir(out_dir) as tmp:
        model.save(str(tmp))
        reloaded = load_sentence_encoder(tmp, device=device)
        diff = float((_embed(reloaded, _CHECK_TEXTS) - expected).abs().max())
        if not diff <= 1e-5:
            raise RuntimeError(
                f"the saved pruned encoder does not reproduce the in-memory one (max |Δ| = {diff:.3g})"
            )
        report["reload_max_abs_diff"] = diff
        write_manifest(
            tmp, "prune", config={"kind": "sentence_encoder", **config}, parent=src_dir, metrics=report, extra=extra
        )
    report["out_dir"] = str(Path(out_dir).expanduser().resolve())
    return report
