"""A registered Hugging Face model type for decoders that stock configs cannot describe.

A stock ``LlamaConfig`` / ``Qwen2Config`` / ``MistralConfig`` has one ``num_attention_heads``,
``num_key_value_heads`` and ``intermediate_size`` for all layers, and every projection is a dense ``nn.Linear``.
Two compressions break that:

* **non-uniform widths**: pruning a different number of query heads, KV heads or MLP neurons per layer
  (:mod:`recsys_slm.prune.structure`); and
* **low-rank factors**: any of the q/k/v/o/gate/up/down projections of a layer replaced by a
  :class:`~recsys_slm.models.low_rank.LowRankLinear` ``up(down(x))`` of rank r.

This module defines config subclasses that add two fields, and ForCausalLM subclasses that build the stock model
and then reshape each layer to them, so a directory saved from such a model loads with
``AutoModelForCausalLM.from_pretrained`` (safetensors only, ``trust_remote_code=False``) with no missing or
unexpected keys:

* ``layer_widths``: ``None`` (every layer has the global widths) or one dict per decoder layer,
  ``{"heads": int, "kv_heads": int, "head_dim": int, "intermediate": int}``;
* ``low_rank``: ``{"<layer index>.<module>": rank}`` where ``<module>`` is one of :data:`LOW_RANK_MODULES`,
  relative to the decoder layer, e.g. ``{"3.self_attn.q_proj": 32, "0.mlp.down_proj": 64}``. Each such module is
  saved as ``model.layers.3.self_attn.q_proj.down.weight`` (r, in) and ``...q_proj.up.weight`` (out, r)
  (+ ``...up.bias``).

The global width fields of a compressed config hold the *envelope*: the smallest uniform shape every layer fits
in (the one :func:`uniformize` ``mode="pad"`` produces); ``head_dim`` is shared by all layers (the rotary
embedding is built once per model).

Model types: ``recsys_slm_llama`` (Llama, SmolLM2), ``recsys_slm_qwen2``, ``recsys_slm_mistral`` (its own type:
Mistral's config carries ``sliding_window`` and its modules have no biases, so mapping it onto Llama would not be
exact).

Trade-off: stock ``transformers`` cannot load these directories without ``recsys_slm`` (it does not know the
model type; there is deliberately no remote code). Import :mod:`recsys_slm.models.compressed` first (which
:func:`recsys_slm.models.loading.load_causal_lm` does), or convert the model back to a stock class with
:func:`uniformize` before publishing it: ``"pad"`` is exact but gives back the parameter savings of the narrow
layers, ``"shrink"`` keeps the savings of the narrowest layer everywhere but is lossy. Low-rank factors are
multiplied back into dense weights in both modes. Further limits: no tensor parallelism (the stock TP plan
assumes dense projections), and static KV caches are sized from the global (envelope) widths, so only the
default dynamic cache is supported for generation.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from recsys_slm.models.layers import decoder_layers
from recsys_slm.models.low_rank import LowRankLinear
from recsys_slm.prune.structure import (
    LayerWidths,
    check_supported,
    layer_widths,
    prune_attention_heads,
    prune_mlp_neurons,
    sync_config,
)

_ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
LOW_RANK_MODULES: tuple[str, ...] = tuple(f"self_attn.{n}" for n in _ATTN_PROJ) + tuple(
    f"mlp.{n}" for n in _MLP_PROJ
)
"""Module names (relative to a decoder layer) that ``low_rank`` may factor."""

_LOW_RANK_KEY = re.compile(r"^(\d+)\.(" + "|".join(re.escape(m) for m in LOW_RANK_MODULES) + r")$")
_WIDTH_KEYS = ("heads", "kv_heads", "head_dim", "intermediate")

# Fields a compressed config adds; they must not reach a stock config (uniformize) and are rebuilt by to_compressed.
_EXTRA_FIELDS = ("layer_widths", "low_rank")
# Keys of ``to_dict()`` that identify the class rather than describe the model.
_CLASS_KEYS = ("model_type", "architectures", "transformers_version")


# ------------------------------------------------------------------------------------------------ configs
class _CompressedConfigMixin:
    """Validation shared by the compressed configs (runs after the stock ``__post_init__``, which fills defaults).

    Subclasses declare the two fields ``layer_widths`` and ``low_rank``; ``from_pretrained`` builds the config from
    config.json through the same path, so a hand-edited file fails here with the field named.
    """

    layer_widths: list[dict] | None
    low_rank: dict[str, int] | None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)  # type: ignore[misc]
        num_layers = self.num_hidden_layers  # type: ignore[attr-defined]
        self.low_rank = _check_low_rank(self.low_rank, num_layers)
        self.layer_widths = _check_layer_widths(self.layer_widths, num_layers, _head_dim(self))

    def widths_of(self, layer: int) -> LayerWidths:
        """Widths of decoder layer ``layer`` (the global fields when ``layer_widths`` is None)."""
        if self.layer_widths is not None:
            return LayerWidths(**self.layer_widths[layer])
        cfg: Any = self
        return LayerWidths(cfg.num_attention_heads, cfg.num_key_value_heads, _head_dim(cfg), cfg.intermediate_size)


def _head_dim(config: PreTrainedConfig) -> int:
    """The head dim the attention modules use: ``config.head_dim``, or hidden / heads when the config has none
    (Qwen2Config declares no ``head_dim`` field; its attention falls back to this, and keeps an explicit one)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class RecsysSlmLlamaConfig(_CompressedConfigMixin, LlamaConfig):
    """``LlamaConfig`` + per-layer ``layer_widths`` and ``low_rank`` ranks (see the module docstring)."""

    model_type = "recsys_slm_llama"
    layer_widths: list[dict] | None = None
    low_rank: dict[str, int] | None = None


class RecsysSlmQwen2Config(_CompressedConfigMixin, Qwen2Config):
    """``Qwen2Config`` + per-layer ``layer_widths`` and ``low_rank`` ranks (see the module docstring)."""

    model_type = "recsys_slm_qwen2"
    layer_widths: list[dict] | None = None
    low_rank: dict[str, int] | None = None


class RecsysSlmMistralConfig(_CompressedConfigMixin, MistralConfig):
    """``MistralConfig`` + per-layer ``layer_widths`` and ``low_rank`` ranks (see the module docstring)."""

    model_type = "recsys_slm_mistral"
    layer_widths: list[dict] | None = None
    low_rank: dict[str, int] | None = None


def _check_low_rank(low_rank: Any, num_layers: int) -> dict[str, int]:
    """Validate ``low_rank`` ({"<layer>.<module>": rank}); returns a plain dict ({} for None)."""
    if low_rank is None:
        return {}
    if not isinstance(low_rank, dict):
        raise ValueError(
            f"low_rank must be a dict {{'<layer>.<module>': rank}}, got {type(low_rank).__name__}"
        )
    out = {}
    for key, rank in low_rank.items():
        match = _LOW_RANK_KEY.match(str(key))
        if match is None:
            raise ValueError(
                f"low_rank key {key!r} names no factorable module: expected '<layer index>.<module>' with <module> "
                f"one of {', '.join(LOW_RANK_MODULES)} (e.g. '3.self_attn.q_proj')"
            )
        if int(match.group(1)) >= num_layers:
            raise ValueError(
                f"low_rank key {key!r} names layer {match.group(1)}, but the model has {num_layers} layers"
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"low_rank[{key!r}] must be an integer rank >= 1, got {rank!r}")
        out[str(key)] = rank
    return out


def _check_layer_widths(widths: Any, num_layers: int, head_dim: int) -> list[dict] | None:
    """Validate ``layer_widths`` (one dict per layer, GQA-consistent, shared head_dim); returns plain dicts."""
    if widths is None:
        return None
    if not isinstance(widths, list | tuple) or len(widths) != num_layers:
        got = len(widths) if isinstance(widths, list | tuple) else type(widths).__name__
        raise ValueError(f"layer_widths must be a list with one entry per layer ({num_layers}), got {got}")
    out = []
    for i, w in enumerate(widths):
        w = asdict(w) if isinstance(w, LayerWidths) else w
        if not isinstance(w, dict) or set(w) != set(_WIDTH_KEYS):
            raise ValueError(
                f"layer_widths[{i}] must be a dict with exactly the keys {list(_WIDTH_KEYS)}, got {w!r}"
            )
        if any(isinstance(w[k], bool) or not isinstance(w[k], int) or w[k] < 1 for k in _WIDTH_KEYS):
            raise ValueError(f"layer_widths[{i}] values must be integers >= 1, got {w!r}")
        if w["heads"] % w["kv_heads"]:
            raise ValueError(
                f"layer_widths[{i}]: heads ({w['heads']}) must be a multiple of kv_heads ({w['kv_heads']}) "
                f"(GQA maps query head h to KV head h // (heads / kv_heads))"
            )
        if w["head_dim"] != head_dim:
            raise ValueError(
                f"layer_widths[{i}]: head_dim {w['head_dim']} differs from the config's head_dim {head_dim}; all "
                f"layers share one rotary embedding, so per-layer head dims are not supported"
            )
        out.append({k: int(w[k]) for k in _WIDTH_KEYS})
    return out


# ------------------------------------------------------------------------------------------------ models
def _new_linear(like: nn.Module, in_features: int, out_features: int) -> nn.Linear:
    """A new nn.Linear (in_features → out_features) on ``like``'s device/dtype, with a bias iff ``like`` has one."""
    weight = _weight_of(like)
    return nn.Linear(
        in_features, out_features, bias=_has_bias(like), device=weight.device, dtype=weight.dtype
    )


def _weight_of(module: nn.Module) -> torch.Tensor:
    return module.down.weight if isinstance(module, LowRankLinear) else module.weight


def _has_bias(module: nn.Module) -> bool:
    return (module.up.bias if isinstance(module, LowRankLinear) else module.bias) is not None


def _set_attention_widths(attn: nn.Module, heads: int, kv_heads: int) -> None:
    """Update the attributes the attention forward reads, exactly as ``prune_attention_heads`` does."""
    attn.num_key_value_groups = heads // kv_heads  # the forward repeats each KV head this many times
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attn, name):
            setattr(attn, name, heads)
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = kv_heads


def _build_structure(model: nn.Module, config: PreTrainedConfig) -> None:
    """Reshape the freshly built stock layers of ``model`` to ``config.layer_widths`` and ``config.low_rank``.

    Allocates right-sized modules (on the device/dtype of the ones they replace: the meta device inside
    ``from_pretrained``, whose loader then fills them from the checkpoint). Outside the meta device the new
    modules get the model's own ``_init_weights`` (what ``from_config`` would have given them).
    """
    layers = decoder_layers(model)
    new_modules: list[nn.Module] = []
    if config.layer_widths is not None:
        for i, layer in enumerate(layers):
            w = config.widths_of(i)
            attn, mlp = layer.self_attn, layer.mlp
            hidden = attn.q_proj.in_features
            attn.q_proj = _new_linear(attn.q_proj, hidden, w.heads * w.head_dim)
            attn.k_proj = _new_linear(attn.k_proj, hidden, w.kv_heads * w.head_dim)
            attn.v_proj = _new_linear(attn.v_proj, hidden, w.kv_heads * w.head_dim)
            attn.o_proj = _new_linear(attn.o_proj, w.heads * w.head_dim, attn.o_proj.out_features)
            _set_attention_widths(attn, w.heads, w.kv_heads)
            mlp.gate_proj = _new_linear(mlp.gate_proj, hidden, w.intermediate)
            mlp.up_proj = _new_linear(mlp.up_proj, hidden, w.intermediate)
            mlp.down_proj = _new_linear(mlp.down_proj, w.intermediate, mlp.down_proj.out_features)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = w.intermediate
            new_modules += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                            mlp.down_proj]  # fmt: skip
    for key, rank in config.low_rank.items():
        index, path = key.split(".", 1)
        parent_name, child = path.rsplit(".", 1)
        parent = layers[int(index)].get_submodule(parent_name)
        old = getattr(parent, child)
        weight = _weight_of(old)
        new = LowRankLinear(old.in_features, old.out_features, rank, bias=_has_bias(old), device=weight.device,
                            dtype=weight.dtype)  # fmt: skip
        setattr(parent, child, new)
        new_modules += [new.down, new.up]
    # a resized projection may have been replaced by its low-rank factors since: init only what is still used
    live = {id(m) for m in model.modules()}
    for module in new_modules:
        if module.weight.device.type != "meta" and id(module) in live:
            model._init_weights(module)


class RecsysSlmLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose layers follow ``config.layer_widths`` / ``config.low_rank``."""

    config_class = RecsysSlmLlamaConfig
    config: RecsysSlmLlamaConfig

    def __init__(self, config: RecsysSlmLlamaConfig) -> None:
        super().__init__(config)
        _build_structure(self, config)


class RecsysSlmQwen2ForCausalLM(Qwen2ForCausalLM):
    """``Qwen2ForCausalLM`` whose layers follow ``config.layer_widths`` / ``config.low_rank``."""

    config_class = RecsysSlmQwen2Config
    config: RecsysSlmQwen2Config

    def __init__(self, config: RecsysSlmQwen2Config) -> None:
        super().__init__(config)
        _build_structure(self, config)


class RecsysSlmMistralForCausalLM(MistralForCausalLM):
    """``MistralForCausalLM`` whose layers follow ``config.layer_widths`` / ``config.low_rank``."""

    config_class = RecsysSlmMistralConfig
    config: RecsysSlmMistralConfig

    def __init__(self, config: RecsysSlmMistralConfig) -> None:
        super().__init__(config)
        _build_structure(self, config)


@dataclass(frozen=True)
class _Family:
    stock_config: type
    stock_model: type
    config: type
    model: type


FAMILIES: dict[str, _Family] = {
    "llama": _Family(LlamaConfig, LlamaForCausalLM, RecsysSlmLlamaConfig, RecsysSlmLlamaForCausalLM),
    "qwen2": _Family(Qwen2Config, Qwen2ForCausalLM, RecsysSlmQwen2Config, RecsysSlmQwen2ForCausalLM),
    "mistral": _Family(
        MistralConfig, MistralForCausalLM, RecsysSlmMistralConfig, RecsysSlmMistralForCausalLM
    ),
}
"""Stock architecture name → (stock config, stock model, compressed config, compressed model)."""


def _family(model: nn.Module) -> _Family:
    """The family of a stock or compressed model; exact class match (an unrelated subclass is not assumed to fit)."""
    for family in FAMILIES.values():
        if type(model) in (family.stock_model, family.model):
            return family
    supported = ", ".join(c.__name__ for f in FAMILIES.values() for c in (f.stock_model, f.model))
    raise ValueError(f"{type(model).__name__} has no compressed model type; supported: {supported}")


_registered = False


def register() -> None:
    """Register the compressed config/model types with ``AutoConfig`` and ``AutoModelForCausalLM``.

    Idempotent (safe to call again; runs at import of this module).
    """
    global _registered
    if _registered:
        return
    for family in FAMILIES.values():
        AutoConfig.register(family.config.model_type, family.config, exist_ok=True)
        AutoModelForCausalLM.register(family.config, family.model, exist_ok=True)
    _registered = True


register()


# ------------------------------------------------------------------------------------------------ conversion
def needs_compressed(model: nn.Module) -> bool:
    """True when a stock config cannot describe ``model``: layer widths differ, or a LowRankLinear is present.

    Raises:
        ValueError: the architecture has no Llama-style attention / gated MLP (e.g. GPT-2).
    """
    check_supported(model)
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        return True
    return len(set(layer_widths(model))) > 1


def _low_rank_map(model: nn.Module) -> dict[str, int]:
    """{"<layer>.<module>": rank} of the LowRankLinear modules of ``model`` (ValueError for any elsewhere)."""
    found: dict[str, int] = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, LowRankLinear):
                found[f"{i}.{name}"] = module.rank
    in_layers = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
    stray = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear) and id(m) not in in_layers]
    if stray:
        raise ValueError(f"LowRankLinear outside the decoder layers is not supported: {stray}")
    # a LowRankLinear at a name outside LOW_RANK_MODULES is refused here, with its name
    return _check_low_rank(found, len(decoder_layers(model)))


def _uniform_target(widths: list[LayerWidths], family: _Family, config: PreTrainedConfig,
                    mode: Literal["pad", "shrink"]) -> LayerWidths:  # fmt: skip
    """The uniform widths every layer is padded up ("pad") or cut down ("shrink") to.

    pad: KV heads ≥ the most KV heads of any layer and query heads per KV group ≥ the most of any layer (so every
    layer's heads keep their KV group when embedded), MLP = the widest. shrink: the mirror image (≤ the fewest).
    Among those head counts the one closest to the layers' is taken that the stock config accepts: LlamaConfig
    (transformers 5.x) rejects ``hidden_size % num_attention_heads != 0`` even with an explicit ``head_dim``, and
    a dir the stock config rejects would not load.
    """
    hd = widths[0].head_dim
    kv_bound = (max if mode == "pad" else min)(w.kv_heads for w in widths)
    g_bound = (max if mode == "pad" else min)(w.heads // w.kv_heads for w in widths)
    inter = (max if mode == "pad" else min)(w.intermediate for w in widths)
    start = kv_bound * g_bound
    counts = range(start, start + config.hidden_size + 1) if mode == "pad" else range(start, 0, -1)
    for n in counts:
        # pad: fewest KV heads (smallest cache); shrink: most KV heads (most of the model kept)
        kvs = range(kv_bound, n + 1) if mode == "pad" else range(min(kv_bound, n), 0, -1)
        for kv in kvs:
            if n % kv or (n // kv < g_bound if mode == "pad" else n // kv > g_bound):
                continue
            try:
                family.stock_config(hidden_size=config.hidden_size, num_attention_heads=n, num_key_value_heads=kv,
                                    head_dim=hd)  # fmt: skip
            except (ValueError, TypeError, StrictDataclassError):
                continue
            return LayerWidths(n, kv, hd, inter)
    raise ValueError(f"no uniform head count for mode={mode!r} that {family.stock_config.__name__} accepts "
                     f"(hidden_size {config.hidden_size}, layer widths {widths})")  # fmt: skip


def _swap(model: nn.Module, cls: type, config: PreTrainedConfig) -> None:
    """Change ``model``'s class to ``cls`` and point every module that held the old config at ``config``."""
    old = model.config
    config._attn_implementation = old._attn_implementation  # not serialised by to_dict; the forward reads it
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = config
    model.__class__ = cls


def _config_dict(config: PreTrainedConfig, widths: LayerWidths, num_layers: int) -> dict[str, Any]:
    d = {k: v for k, v in config.to_dict().items() if k not in _CLASS_KEYS + _EXTRA_FIELDS}
    d.update(num_attention_heads=widths.heads, num_key_value_heads=widths.kv_heads, head_dim=widths.head_dim,
             intermediate_size=widths.intermediate, num_hidden_layers=num_layers)  # fmt: skip
    return d


def to_compressed(model: nn.Module) -> nn.Module:
    """Turn a pruned/factored stock model (or a compressed one pruned further) into the registered type, in place.

    Reads ``layer_widths`` and ``low_rank`` from the tensors (``q_proj`` rows / head_dim = heads, ...), swaps in
    the compressed config (global widths: the pad envelope) and class; weights and outputs are unchanged, and
    ``save_pretrained`` then gives a directory ``AutoModelForCausalLM.from_pretrained`` loads back (with this
    module imported). Also fine for a model that :func:`needs_compressed` says is stock-expressible.

    Returns:
        ``model`` itself (now a ``RecsysSlm*ForCausalLM``).

    Raises:
        ValueError: unsupported architecture, layers with different head dims or a head dim other than the
            config's, or a LowRankLinear outside the q/k/v/o/gate/up/down projections of the decoder layers.
    """
    family = _family(model)
    check_supported(model)
    widths = layer_widths(model)
    low_rank = _low_rank_map(model)
    config = model.config
    if {w.head_dim for w in widths} != {_head_dim(config)}:
        raise ValueError(f"head_dim per layer {[w.head_dim for w in widths]} must all equal the config's head_dim "
                         f"{_head_dim(config)} (one rotary embedding serves every layer)")  # fmt: skip
    d = _config_dict(config, _uniform_target(widths, family, config, "pad"), len(widths))
    d.update(layer_widths=[asdict(w) for w in widths], low_rank=low_rank)
    _swap(model, family.model, family.config(**d))
    return model


@torch.no_grad()
def _densify(model: nn.Module) -> None:
    """Replace every LowRankLinear by the nn.Linear ``up.weight @ down.weight`` (+ bias) it stands for."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            dense = _new_linear(module, module.in_features, module.out_features)
            # the product in fp32 (bf16 factors would round twice), then cast to the module's dtype
            dense.weight.copy_(module.up.weight.float() @ module.down.weight.float())
            if module.up.bias is not None:
                dense.bias.copy_(module.up.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, dense)


@torch.no_grad()
def _embed_linear(old: nn.Linear, out_features: int, in_features: int, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> nn.Linear:  # fmt: skip
    """A zero Linear (out_features, in_features) holding ``old``'s weight at output ``rows`` / input ``cols``.

    ``rows``/``cols`` (None: all) are the positions in the new layer of old's rows/columns; everything else is
    zero, including the bias of the padded rows (padding input columns keeps the bias as it is).
    """
    new = _new_linear(old, in_features, out_features)
    device = old.weight.device
    rows = torch.arange(old.out_features, device=device) if rows is None else rows.to(device)
    cols = torch.arange(old.in_features, device=device) if cols is None else cols.to(device)
    new.weight.zero_()
    new.weight[rows[:, None], cols[None, :]] = old.weight
    if old.bias is not None:
        new.bias.zero_()
        new.bias[rows] = old.bias
    return new


def _pad_layer(layer: nn.Module, w: LayerWidths, target: LayerWidths) -> None:
    """Zero-pad one layer to ``target`` widths; outputs unchanged.

    Query head h (group k = h // g, slot j = h % g, g = heads / kv_heads) moves to k·G + j with G the target
    queries per group, so it still reads KV head k; padded q rows and o columns are zero, so padded heads add
    nothing. Padded k/v rows (KV groups only padded heads read) and MLP neurons (gate/up rows, down columns) are
    zero too: silu(0)·0 = 0.
    """
    attn, mlp, hd = layer.self_attn, layer.mlp, w.head_dim
    g, big_g = w.heads // w.kv_heads, target.heads // target.kv_heads
    heads = torch.arange(w.heads)
    slots = (heads // g) * big_g + heads % g
    q_rows = (slots[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)  # (heads·hd,) new q rows / o cols
    hidden = attn.q_proj.in_features
    attn.q_proj = _embed_linear(attn.q_proj, target.heads * hd, hidden, rows=q_rows)
    attn.k_proj = _embed_linear(attn.k_proj, target.kv_heads * hd, hidden)
    attn.v_proj = _embed_linear(attn.v_proj, target.kv_heads * hd, hidden)
    attn.o_proj = _embed_linear(attn.o_proj, attn.o_proj.out_features, target.heads * hd, cols=q_rows)
    _set_attention_widths(attn, target.heads, target.kv_heads)
    mlp.gate_proj = _embed_linear(mlp.gate_proj, target.intermediate, hidden)
    mlp.up_proj = _embed_linear(mlp.up_proj, target.intermediate, hidden)
    mlp.down_proj = _embed_linear(mlp.down_proj, mlp.down_proj.out_features, target.intermediate)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = target.intermediate


def _layer_magnitudes(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads (n,), neurons (I,)) weight-norm importance of one layer, the same formula as
    :func:`recsys_slm.prune.importance.magnitude_scores` (which stacks layers, so needs uniform widths)."""
    attn, mlp = layer.self_attn, layer.mlp
    hd = attn.head_dim
    n = attn.q_proj.out_features // hd
    q = attn.q_proj.weight.detach().float().reshape(n, hd, -1)  # (n, hd, H)
    o = attn.o_proj.weight.detach().float().reshape(-1, n, hd).transpose(0, 1)  # (n, H, hd)
    heads = (q.pow(2).sum((1, 2)) + o.pow(2).sum((1, 2))).sqrt()
    gate, up, down = (mlp.gate_proj.weight.detach().float(), mlp.up_proj.weight.detach().float(),
                      mlp.down_proj.weight.detach().float())  # fmt: skip
    return heads, (gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt()


def _shrink_layer(layer: nn.Module, w: LayerWidths, target: LayerWidths) -> None:
    """Cut one layer to ``target`` widths, dropping the lowest-magnitude KV groups, query heads and neurons."""
    heads, neurons = _layer_magnitudes(layer)
    g, keep_g = w.heads // w.kv_heads, target.heads // target.kv_heads
    by_group = heads.reshape(w.kv_heads, g)  # (kv_heads, g)
    groups = sorted(by_group.sum(1).topk(target.kv_heads).indices.tolist())
    keep = sorted(k * g + j for k in groups for j in by_group[k].topk(keep_g).indices.tolist())
    prune_attention_heads(layer.self_attn, keep)
    prune_mlp_neurons(layer.mlp, sorted(neurons.topk(target.intermediate).indices.tolist()))


def uniformize(model: nn.Module, mode: Literal["pad", "shrink"] = "pad") -> nn.Module:
    """Turn a compressed (or non-uniform stock) model into a stock class with a stock config, in place.

    Low-rank factors are multiplied back into dense Linears (exact up to float rounding). Widths:

    * ``"pad"``: every layer is zero-padded to the pad envelope (the most KV heads and query heads per KV group
      of any layer, the widest MLP; see :func:`_uniform_target`). Outputs are unchanged; the parameter savings of
      the narrower layers are lost (padding is stored as zeros).
    * ``"shrink"``: every layer is cut to the narrowest (fewest KV heads, query heads per group and neurons),
      dropping the lowest-magnitude KV groups / heads / neurons. Lossy: re-evaluate (or heal) afterwards.

    Deep-copy first to keep the compressed model. ``save_pretrained`` then gives a directory stock
    ``transformers`` loads without recsys_slm.

    Returns:
        ``model`` itself (now e.g. a ``LlamaForCausalLM`` with a ``LlamaConfig``).

    Raises:
        ValueError: ``mode`` is neither "pad" nor "shrink", or the architecture is unsupported.
    """
    if mode not in ("pad", "shrink"):
        raise ValueError(f"mode must be 'pad' or 'shrink', got {mode!r}")
    family = _family(model)
    check_supported(model)
    _densify(model)
    widths = layer_widths(model)
    if len({w.head_dim for w in widths}) != 1:
        raise ValueError(f"layers have different head dims {[w.head_dim for w in widths]}; cannot uniformize")
    target = _uniform_target(widths, family, model.config, mode)
    for layer, w in zip(decoder_layers(model), widths, strict=True):
        if w == target:
            continue
        (_pad_layer if mode == "pad" else _shrink_layer)(layer, w, target)
    _swap(model, family.stock_model, family.stock_config(**_config_dict(model.config, target, len(widths))))
    sync_config(model)  # checks the layers now agree (and writes the same values)
    return model
