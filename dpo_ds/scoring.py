"""Scoring: summed completion log-probs of a collated batch from one forward of an engine, computed inside the
model's output projection where that is exact (`fused_head`) or from its full logits (dpo_ds.logprobs)."""
from __future__ import annotations

import ast
import contextlib
import inspect
import logging
import textwrap

import torch

from dpo_ds import packed_attention
from dpo_ds.logprobs import Scoring, score_hidden, score_logits, scored_positions, scoring_of

logger = logging.getLogger("dpo_ds")


def _returns_head_output_unchanged(model_class: type) -> bool:
    """Whether `model_class.forward` binds `logits` exactly once, to `self.lm_head(...)`, and never updates it
    (augmented assignment or an in-place method): then the model returns lm_head's output as it is."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(model_class.forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    writes = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(n, ast.Name) and n.id == "logits" for t in targets for n in ast.walk(t)):
                writes.append(node)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_")
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "logits"):
            return False
    return (len(writes) == 1 and isinstance(writes[0], ast.Assign) and isinstance(writes[0].value, ast.Call)
            and ast.unparse(writes[0].value.func) == "self.lm_head")


def fused_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output projection to score inside, or None where the logits path must be used (resolved once per
    engine: the engine's owner keeps it and passes it to `forward_logps`).

    Fusing replaces lm_head's output, so it is only done where the model returns `lm_head(hidden_states)`
    unchanged (Llama, Mistral, Mixtral, Qwen2/3 and their MoE variants, Phi-3, Gemma, OLMo-2, DeepSeek-V3, ...;
    not Gemma-2's soft-capping, Cohere's or Granite's scaling) and lm_head is a bias-free Linear.
    """
    head = model.get_output_embeddings()
    ok = (isinstance(head, torch.nn.Linear) and head.bias is None and _returns_head_output_unchanged(type(model)))
    if not ok:
        logger.info("fused_lm_head: %s does not return lm_head(hidden) unchanged; scoring from full logits",
                    type(model).__name__)
    return head if ok else None


def scoring_head(model: torch.nn.Module, fused_lm_head: bool) -> torch.nn.Linear | None:
    """The head `forward_logps` scores inside: `fused_head(model)` when the fused_lm_head field is on."""
    return fused_head(model) if fused_lm_head else None


@contextlib.contextmanager
def _scoring_head(head: torch.nn.Linear, score):
    """Within the block, calling `head` returns score(hidden) instead of logits. It is still called through the
    module, so ZeRO-3's hooks gather its weight for the forward and again for the backward."""
    head.forward = score
    try:
        yield
    finally:
        del head.forward


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait: a plain copy from pageable memory synchronises
    the stream (the CPU would stop queueing work until the GPU caught up); from pinned memory it is async."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _varlen_attention_kwargs(position_ids: torch.Tensor, device) -> dict:
    """The cumulative sequence lengths of a packed row (flash attention's varlen arguments), from the CPU batch:
    given to the model, they spare every layer recomputing them from the position ids (a nonzero and a max, each
    a device sync); sdpa_packed gets their host copy (packed_attention.note_bounds)."""
    starts = (position_ids.reshape(-1) == 0).nonzero().squeeze(-1)
    cu = torch.cat([starts, torch.tensor([position_ids.numel()])]).to(torch.int32)
    longest = int(cu.diff().max())
    on_device = to_device(cu, device)
    packed_attention.note_bounds(on_device, cu.tolist())
    return {"cu_seq_lens_q": on_device, "cu_seq_lens_k": on_device, "max_length_q": longest, "max_length_k": longest}


def forward_logps(engine, batch: dict[str, torch.Tensor], chunk_size: int, head: torch.nn.Linear | None,
                  router_aux: bool = False, wpo: bool = False) -> tuple[torch.Tensor, ...]:
    """(summed completion log-probs, completion token counts, router loss or None) of every sequence of a collated
    batch, from one forward; with `wpo`, a fourth: the per-sequence sums of WPO's token terms (Scoring.wpo).

    `head` (fused_lm_head: `fused_head` of the engine's model): scored inside this output projection; None: from
    the full logits. `router_aux`: also the model's router load-balancing loss of the same forward
    (mixture-of-experts models: `output_router_logits=True` makes transformers return it as `aux_loss`)."""
    device = engine.device
    input_ids = to_device(batch["input_ids"], device)
    loss_mask = to_device(batch["loss_mask"], device)
    # Sequence metadata comes from the CPU batch: read back from the device, it would cost a sync per micro-step.
    # LD-DPO (ld_alpha): per-token weights of the sums (logprobs.ld_token_weights, set by the step)
    weights = to_device(batch["token_weights"], device) if "token_weights" in batch else None
    if "sequence_ids" in batch:  # packed: no attention mask, position ids mark where each sequence starts
        inputs = {"position_ids": to_device(batch["position_ids"], device)}
        scoring = scoring_of(input_ids, loss_mask, to_device(batch["sequence_ids"], device),
                             int(batch["sequence_ids"].max()) + 1, weights, wpo)
        if packed_attention.attends_sequences_alone(str(engine.module.config._attn_implementation)):
            inputs.update(_varlen_attention_kwargs(batch["position_ids"], device))
    else:
        inputs = {"attention_mask": to_device(batch["attention_mask"], device)}
        scoring = scoring_of(input_ids, loss_mask, token_weights=weights, wpo=wpo)
    return score_forward(engine, input_ids, inputs, scoring, scored_positions(batch["loss_mask"]), chunk_size, head,
                         router_aux)


def score_forward(engine, input_ids: torch.Tensor, inputs: dict, scoring: Scoring, scored: torch.Tensor,
                  chunk_size: int, head: torch.nn.Linear | None, router_aux: bool
                  ) -> tuple[torch.Tensor, ...]:
    """One forward of `engine` on `input_ids` (on its device) with the model inputs `inputs`, scored as
    `scoring` says: (per-sequence log-prob sums, token counts, router loss or None), plus the WPO sums with
    `scoring.wpo`. `scored`: the CPU Scoring's flat scored positions (the fused head projects only those)."""
    if router_aux:
        inputs = {**inputs, "output_router_logits": True}
    if head is None:
        out = engine(input_ids=input_ids, use_cache=False, **inputs)
        sums, counts, *wpo = score_logits(out.logits, scoring, chunk_size)
        return sums, counts, _aux_loss(out, router_aux), *wpo
    extras, scored = [], to_device(scored, engine.device)

    def score(hidden: torch.Tensor) -> torch.Tensor:
        sums, *rest = score_hidden(hidden, head.weight, scoring, chunk_size, scored)
        extras.extend(rest)  # token counts (and the WPO sums)
        return sums

    with _scoring_head(head, score):
        out = engine(input_ids=input_ids, use_cache=False, **inputs)
    return out.logits, extras[0], _aux_loss(out, router_aux), *extras[1:]


def _aux_loss(out, router_aux: bool) -> torch.Tensor | None:
    if not router_aux:
        return None
    aux = getattr(out, "aux_loss", None)
    if aux is None:
        raise RuntimeError("router_aux_loss_coef > 0 but the model returned no aux_loss for output_router_logits")
    return aux
