"""Distillation (stages 1 and 3): losses (token-level divergences, ranker-score objectives, cross-tokenizer
ULD/GOLD), student construction (``student``), transfer sets (``transfer_set``), the off-policy teacher cache
(``teacher_cache``), the ranker objective (``objective``), on-policy GKD (``on_policy``) and the trainer
(``trainer.distill``, the ``recsys-slm distill`` command). See docs/distillation.md.

Only the losses are imported here (pure torch); import the other modules directly.
"""

from recsys_slm.distill.cross_tokenizer import (
    GoldLoss,
    GoldLossConfig,
    ULDLoss,
    ULDLossConfig,
    align_offsets,
    check_vocab_size,
    encode_with_offsets,
    filler_token_ids,
    ignored_ids,
    mask_logits,
    merge_group_logprobs,
    shared_vocab,
    sorted_l1,
    uld_distance,
)
from recsys_slm.distill.losses import (
    DistillLoss,
    DistillLossConfig,
    forward_kl,
    generalized_jsd,
    hard_label_ce,
    mix_losses,
    reverse_kl,
    topk_bucket_logprobs,
    topk_distill_loss,
    topk_storage_bytes,
    total_variation,
)
from recsys_slm.distill.ranker_losses import (
    BinaryKLLoss,
    HiddenStateLoss,
    ListwiseKLLoss,
    MarginMSELoss,
    uniform_layer_map,
)

__all__ = [
    "BinaryKLLoss",
    "DistillLoss",
    "DistillLossConfig",
    "GoldLoss",
    "GoldLossConfig",
    "HiddenStateLoss",
    "ListwiseKLLoss",
    "MarginMSELoss",
    "ULDLoss",
    "ULDLossConfig",
    "align_offsets",
    "check_vocab_size",
    "encode_with_offsets",
    "filler_token_ids",
    "forward_kl",
    "generalized_jsd",
    "hard_label_ce",
    "ignored_ids",
    "mask_logits",
    "merge_group_logprobs",
    "mix_losses",
    "reverse_kl",
    "shared_vocab",
    "sorted_l1",
    "topk_bucket_logprobs",
    "topk_distill_loss",
    "topk_storage_bytes",
    "total_variation",
    "uld_distance",
    "uniform_layer_map",
]
