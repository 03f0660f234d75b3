"""Verbalizer scoring: P(" Yes") from a causal LM without materialising full-vocabulary logits.

The score of a prompt is read at its last position: the final hidden state h (H,) times the two output-embedding
rows of the verbalizer tokens, W[[yes, no]] (2, H), gives logit_yes and logit_no; the ranker score is
``sigmoid(logit_yes - logit_no)`` = P(yes) normalised over {yes, no}. Only a (B, 2) tensor of logits is ever
formed, never (B, L, V).

References:
    TALLRec (Bao et al., RecSys'23, arXiv 2305.00447): Yes/No verbalizer, AUC of P("Yes").
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch


def verbalizer_token_ids(tokenizer, yes_token: str = " Yes", no_token: str = " No") -> tuple[int, int]:
    """Token ids of the two verbalizer strings.

    Raises:
        ValueError: a verbalizer string does not encode to exactly one token with this tokenizer.
    """
    ids = []
    for text in (yes_token, no_token):
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(
                f"verbalizer {text!r} encodes to {len(encoded)} tokens {encoded} with this tokenizer; "
                "it must be a single token (choose another prompt.yes_token / prompt.no_token)"
            )
        ids.append(int(encoded[0]))
    return ids[0], ids[1]


class VerbalizerScorer:
    """Batched Yes/No scoring of rendered prompts with any Hugging Face causal LM.

    Args:
        model: a ``*ForCausalLM`` whose output head is a linear map of the final hidden state
            (Llama, Qwen2, Mistral, GPT-2, Gemma with its final-logit soft-capping applied).
        tokenizer: its tokenizer.
        yes_token (str) / no_token (str): verbalizer strings, one token each.
        batch_size (int): prompts per forward pass.
        padding_side (str): "left" (default) or "right"; scores do not depend on it.
    """

    def __init__(
        self,
        model,
        tokenizer,
        yes_token: str = " Yes",
        no_token: str = " No",
        batch_size: int = 16,
        padding_side: str = "left",
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.model = model
        self.tokenizer = tokenizer
        self.yes_id, self.no_id = verbalizer_token_ids(tokenizer, yes_token, no_token)
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def verbalizer_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, H) final hidden states → (B, 2) logits of [yes, no]."""
        head = self.model.get_output_embeddings()
        rows = head.weight[[self.yes_id, self.no_id]]  # (2, H)
        logits = hidden.to(rows.dtype) @ rows.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[[self.yes_id, self.no_id]]
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) right- or left-padded ids → (B, H) final hidden state at each row's last real token.

        Position ids are derived from the attention mask so that padding on either side never changes a score
        (absolute-position models such as GPT-2 would otherwise shift).
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        hidden = out.last_hidden_state  # (B, L, H)
        last = attention_mask.long().cumsum(-1).argmax(-1)  # index of the last real token per row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    @torch.inference_mode()
    def score_token_ids(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Score already-tokenised prompts → (N, 2) float32 logits of [yes, no]."""
        outputs = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                span = slice(width - len(seq), width) if self.padding_side == "left" else slice(0, len(seq))
                ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
                mask[row, span] = 1
            hidden = self.last_hidden(ids.to(self.device), mask.to(self.device))
            outputs.append(self.verbalizer_logits(hidden).cpu())
        return torch.cat(outputs) if outputs else torch.empty((0, 2))

    @torch.inference_mode()
    def score_shared_prefix(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]) -> torch.Tensor:
        """Score ``prefix + suffix_i`` for every suffix, running the shared prefix only once.

        The prefix (system prompt, profile, history: P tokens) is run once with a KV cache; each batch of
        suffixes (candidate text + closing turn: up to S tokens, right-padded) attends to a batch copy of that
        cache, with positions P..P+S-1. Right padding is safe here: causal attention never lets a real suffix
        token see the padding after it. The result equals independent scoring of ``prefix + suffix_i``.

        Args:
            prefix (Sequence[int]): shared token ids, length P >= 1.
            suffixes (Sequence[Sequence[int]]): N suffix token id lists, each non-empty.

        Returns:
            torch.Tensor: (N, 2) float32 logits of [yes, no].
        """
        if not prefix or any(len(s) == 0 for s in suffixes):
            raise ValueError("shared-prefix scoring needs a non-empty prefix and non-empty suffixes")
        device = self.device
        prefix_ids = torch.as_tensor([list(prefix)], dtype=torch.long, device=device)  # (1, P)
        out = self.model.base_model(input_ids=prefix_ids, use_cache=True)
        prefix_cache = out.cache if "cache" in out else out.past_key_values
        length = prefix_ids.shape[1]
        outputs = []
        for start in range(0, len(suffixes), self.batch_size):
            chunk = suffixes[start : start + self.batch_size]
            batch, width = len(chunk), max(len(s) for s in chunk)
            ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((batch, length + width), dtype=torch.long)
            mask[:, :length] = 1
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
                mask[row, length : length + len(seq)] = 1
            cache = copy.deepcopy(prefix_cache)  # forward() appends to the cache: give each batch its own copy
            cache.batch_repeat_interleave(batch)
            positions = torch.arange(length, length + width, device=device).unsqueeze(0).expand(batch, -1)
            hidden = self.model.base_model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions,
                cache=cache,
                use_cache=True,
            ).last_hidden_state  # (B, S, H)
            last = torch.as_tensor([len(s) - 1 for s in chunk], device=device)
            outputs.append(self.verbalizer_logits(hidden[torch.arange(batch, device=device), last]).cpu())
        return torch.cat(outputs) if outputs else torch.empty((0, 2))

    def score_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Rendered prompts → (N,) P(yes) normalised over the two verbalizer tokens."""
        sequences = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        logits = self.score_token_ids(sequences)
        return torch.sigmoid(logits[:, 0] - logits[:, 1])
