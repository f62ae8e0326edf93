"""Diverse (group) beam search for ``transformers>=5``.

transformers 5 removed group beam search (``num_beam_groups > 1`` + ``diversity_penalty``, Vijayakumar et al.
2016, https://arxiv.org/abs/1610.02424) from its core and only offers it as remote code on the Hub
(``transformers-community/group-beam-search``), which this project never loads. This module is our own,
self-contained re-implementation with the semantics of transformers 4.x ``_group_beam_search`` +
``BeamSearchScorer`` + ``HammingDiversityLogitsProcessor``:

* the ``num_beams`` beams of every prompt are split into ``num_beam_groups`` groups of
  ``num_beams // num_beam_groups`` beams; each group runs ordinary beam search over its own beams;
* groups are processed one after another at each step, and group ``g`` has
  ``diversity_penalty * count`` subtracted from the log-prob of every token that groups ``0..g-1`` chose at the
  same step for the same prompt (Hamming diversity) -- applied after ``log_softmax`` and before the other
  logits processors, as in 4.x;
* finished hypotheses are kept per group (``length_penalty`` / ``early_stopping`` as in HF beam search) and at
  the end the ``num_return_sequences`` best hypotheses over all groups of a prompt are returned.

The per-group bookkeeping mirrors the vectorised beam search of transformers 5 (``GenerationMixin._beam_search``),
so that with ``num_beam_groups=1`` the output equals ``generate(num_beams=...)`` token for token.

Usage (``generate`` prepares inputs, cache, logits processors and stopping criteria, then calls us)::

    out = model.generate(input_ids, attention_mask=mask, num_beams=4, num_beam_groups=2,
                         diversity_penalty=1.0, max_new_tokens=8, custom_generate=group_beam_search)

How ``generate`` dispatches (transformers 5.24): a *callable* ``custom_generate`` makes ``generate`` skip the
"moved to the Hub" error for GROUP_BEAM_SEARCH (``_get_deprecated_gen_repo`` returns None whenever
``custom_generate`` is set) and ``GenerationConfig`` validation does not reject ``num_beam_groups > 1``; after the
usual preparation (inputs expanded to ``batch * num_beams`` rows, DynamicCache under ``model_kwargs["cache"]``,
``max_length`` resolved) it calls ``custom_generate(model, input_ids, logits_processor=..., stopping_criteria=...,
generation_config=..., **model_kwargs)``. Caveat: ``generate`` passes ``synced_gpus`` / ``streamer`` to a callable
only if the callable's signature has parameters that ``_sample`` lacks, so here they always take their defaults.

Return value: like ``generate`` -- a LongTensor ``[batch * num_return_sequences, seq_len]``, or with
``return_dict_in_generate=True`` a ``GenerateBeamDecoderOnlyOutput`` with ``sequences``, ``beam_indices``, ``cache``,
and with ``output_scores=True`` also ``sequences_scores`` and ``scores`` (per step ``[batch * num_beams, vocab]``
processed log-probs, diversity penalty included, so ``model.compute_transition_scores(out.sequences, out.scores,
out.beam_indices)`` sums to ``sequences_scores * generated_len ** length_penalty``); ``output_logits`` fills
``logits``. Attentions / hidden states are not collected; encoder-decoder models and sampling are not supported.

Notes:

* Logits processors are called once per group on that group's ``batch * group_size`` rows (as in 4.x), so a
  processor that infers prompts from the row count with the *full* ``num_beams`` (``prefix_allowed_tokens_fn``)
  would misassign rows; row-wise processors and the encoder-input ones (which divide by the row count) are fine.
* Unlike HF's beam search, running beams are ranked by a stable sort on "finished" rather than by
  ``score - 1e9`` (which ties in float32): otherwise at ``max_length`` the tokens later groups are penalised for
  would be arbitrary. Padding after EOS uses ``pad_token_id``; HF 5 beam search pads with ``pad or eos``, which
  differs only when ``pad_token_id == 0``.
* This relies on ``GenerationMixin`` internals of transformers 5.24 (``_prefill``, ``_has_unfinished_sequences``,
  ``_update_model_kwargs_for_generation``, ``prepare_inputs_for_generation``), like HF's own decoding methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

# "Impossible" score, the same finite sentinel HF beam search uses (finite, so arithmetic never produces NaN).
_NEG = -1.0e9


@dataclass
class _Beams:
    """Hypotheses of one beam group for every prompt; tensors are ``[batch, beams, ...]``."""

    sequences: torch.Tensor  # [B, k, max_length] prompt + generated ids, unfilled tail = fill value
    scores: torch.Tensor  # [B, k] summed log-probs (running) or length-normalised score (finished)
    beam_indices: torch.Tensor  # [B, k, max_new_tokens] row of `scores[step]` each token came from; -1 = none


@dataclass
class _Group:
    """Search state of one beam group (``group_size`` beams per prompt)."""

    running: _Beams  # live beams, best first
    finished: _Beams  # best finished hypotheses so far (scores -1e9 while a slot is empty)
    is_finished: torch.Tensor  # [B, group_size] slot holds a finished hypothesis
    improvable: torch.Tensor  # [B, 1] can the running beams still beat the finished ones (HF heuristic)
    row_offset: torch.Tensor  # [B, 1] flat row of the group's first beam: prompt * num_beams + g * group_size


def _gather(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Select along the beam dimension (dim 1) with per-prompt ``indices`` of shape ``[B, k]``."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


def _select(beams: _Beams, indices: torch.Tensor) -> _Beams:
    return _Beams(*(_gather(t, indices) for t in (beams.sequences, beams.scores, beams.beam_indices)))


def _cat(a: _Beams, b: _Beams) -> _Beams:
    return _Beams(*(torch.cat(pair, dim=1) for pair in zip(
        (a.sequences, a.scores, a.beam_indices), (b.sequences, b.scores, b.beam_indices))))


def _check_config(model: PreTrainedModel, config: GenerationConfig) -> tuple[int, int]:
    """Validate the parameterisation (what 4.x ``BeamSearchScorer`` checked); return (groups, beams per group)."""
    num_beams, num_groups = config.num_beams, config.num_beam_groups or 1
    if model.config.is_encoder_decoder:
        raise TypeError("group_beam_search supports decoder-only models only")
    if config.do_sample:
        raise ValueError("Diverse beam search cannot be used in sampling mode; set do_sample=False")
    if num_beams < 1 or num_groups < 1 or num_beams % num_groups != 0:
        raise ValueError(f"num_beams ({num_beams}) must be a positive multiple of num_beam_groups ({num_groups})")
    if (config.diversity_penalty or 0.0) < 0.0:
        raise ValueError(f"diversity_penalty must be >= 0, got {config.diversity_penalty}")
    if config.num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({config.num_return_sequences}) must be <= num_beams ({num_beams})")
    return num_groups, num_beams // num_groups


def _hamming_penalty(chosen: list[torch.Tensor], vocab_size: int, penalty: float) -> torch.Tensor:
    """``penalty * count`` per prompt and token over the tokens earlier groups chose at this step -> ``[B, V]``."""
    tokens = torch.cat(chosen, dim=1)
    counts = torch.zeros(tokens.shape[0], vocab_size, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=counts.dtype))
    return penalty * counts


def _top_candidates(running: _Beams, log_probs: torch.Tensor, cur_len: int, step: int,
                    row_offset: torch.Tensor, num_candidates: int) -> _Beams:
    """Best ``num_candidates`` one-token extensions of a group's running beams, by accumulated log-prob.

    More candidates than beams are kept so that the group can continue with ``group_size`` live beams even if
    the best extensions end the hypothesis (EOS or another stopping criterion).
    """
    batch, beams, vocab = log_probs.shape
    accumulated = (log_probs + running.scores[:, :, None]).view(batch, beams * vocab)
    scores, flat_idx = torch.topk(accumulated, k=num_candidates)
    source_beam, tokens = flat_idx // vocab, flat_idx % vocab
    candidates = _select(running, source_beam)
    candidates.scores = scores
    candidates.sequences[:, :, cur_len] = tokens
    # Row of this step's `scores` the token was picked from, as `compute_transition_scores` expects.
    candidates.beam_indices[:, :, step] = row_offset + source_beam
    return candidates


def _next_running(candidates: _Beams, hits_stop: torch.Tensor, group_size: int) -> _Beams:
    """Best ``group_size`` candidates that did not finish continue as the group's running beams."""
    # Candidates are sorted best first; a stable sort on `hits_stop` keeps that order and puts finished ones
    # last. (Ranking by `score - 1e9` instead, as HF does, makes finished candidates tie in float32, so at
    # max_length the "running" tokens -- which the diversity penalty of later groups uses -- would be arbitrary.)
    keep = torch.sort(hits_stop.to(torch.uint8), dim=1, stable=True).indices[:, :group_size]
    running = _select(candidates, keep)
    running.scores = running.scores + _gather(hits_stop, keep).float() * _NEG  # finished ones never come back
    return running


def _update_finished(group: _Group, candidates: _Beams, hits_stop: torch.Tensor, gen_len: int,
                     config: GenerationConfig) -> None:
    """Merge newly finished candidates into the group's ``group_size`` best finished hypotheses."""
    group_size = group.is_finished.shape[1]
    # Like 4.x BeamSearchScorer: only candidates ranked among the top `group_size` may become hypotheses,
    # the rest merely backs up the running beams.
    in_top = torch.arange(hits_stop.shape[1], device=hits_stop.device) < group_size
    just_finished = hits_stop & in_top
    scores = candidates.scores / (gen_len ** config.length_penalty)
    # Nothing may be added once the group has enough hypotheses (early_stopping=True) or cannot improve.
    full = group.is_finished.all(dim=1, keepdim=True) & (config.early_stopping is True)
    scores = scores + full.float() * _NEG + (~group.improvable).float() * _NEG + (~just_finished).float() * _NEG
    merged = _cat(group.finished, _Beams(candidates.sequences, scores, candidates.beam_indices))
    keep = torch.topk(merged.scores, k=group_size).indices
    group.finished = _select(merged, keep)
    group.is_finished = _gather(torch.cat((group.is_finished, just_finished), dim=1), keep)


def _update_improvable(group: _Group, gen_len: int, max_new_tokens: int, config: GenerationConfig) -> None:
    """HF's early-stopping heuristic: can the best running beam still beat the worst finished hypothesis?"""
    length_penalty = config.length_penalty
    # early_stopping="never" with a length bonus: the best case is a hypothesis of maximal length.
    best_len = max_new_tokens if (config.early_stopping == "never" and length_penalty > 0.0) else gen_len
    best_possible = group.running.scores[:, :1] / (best_len ** length_penalty)
    worst_finished = torch.where(group.is_finished, group.finished.scores.min(dim=1, keepdim=True).values, _NEG)
    group.improvable = group.improvable & (best_possible > worst_finished).any(dim=-1, keepdim=True)


def _advance_group(group: _Group, log_probs: torch.Tensor, cur_len: int, prompt_len: int, num_candidates: int,
                   stopping_criteria: StoppingCriteriaList, all_scores: tuple | None,
                   config: GenerationConfig) -> torch.Tensor:
    """One beam-search step of one group on its processed log-probs ``[B, group_size, V]``; returns hits_stop."""
    batch_size, group_size = group.is_finished.shape
    candidates = _top_candidates(group.running, log_probs, cur_len, cur_len - prompt_len, group.row_offset,
                                 num_candidates)
    flat_candidates = candidates.sequences[:, :, :cur_len + 1].reshape(batch_size * num_candidates, cur_len + 1)
    hits_stop = stopping_criteria(flat_candidates, all_scores).view(batch_size, num_candidates)
    group.running = _next_running(candidates, hits_stop, group_size)
    _update_finished(group, candidates, hits_stop, cur_len + 1 - prompt_len, config)
    return hits_stop


def _init_groups(input_ids: torch.Tensor, num_groups: int, group_size: int, max_length: int,
                 fill: int) -> list[_Group]:
    num_beams = num_groups * group_size
    batch_size, prompt_len = input_ids.shape[0] // num_beams, input_ids.shape[1]
    device = input_ids.device
    prompts = torch.full((batch_size, num_beams, max_length), fill, dtype=torch.long, device=device)
    prompts[:, :, :prompt_len] = input_ids.view(batch_size, num_beams, prompt_len)
    groups = []
    for g in range(num_groups):
        # Only the first beam of each group is live at the start, otherwise a group's beams would all be equal.
        scores = torch.full((batch_size, group_size), _NEG, device=device)
        scores[:, 0] = 0.0
        sequences = prompts[:, g * group_size:(g + 1) * group_size].clone()
        no_indices = torch.full((batch_size, group_size, max_length - prompt_len), -1, dtype=torch.long, device=device)
        groups.append(_Group(
            running=_Beams(sequences, scores, no_indices),
            finished=_Beams(sequences.clone(), torch.full_like(scores, _NEG), no_indices.clone()),
            is_finished=torch.zeros(batch_size, group_size, dtype=torch.bool, device=device),
            improvable=torch.ones(batch_size, 1, dtype=torch.bool, device=device),
            row_offset=torch.arange(batch_size, device=device)[:, None] * num_beams + g * group_size,
        ))
    return groups


def _reorder_cache(model: PreTrainedModel, model_kwargs: dict[str, Any], beam_rows: torch.Tensor) -> None:
    """Make KV-cache row ``i`` hold the history of the beam now at row ``i`` (it came from ``beam_rows[i]``)."""
    cache = model_kwargs.get("cache")
    if cache is None:  # use_cache=False
        return
    if hasattr(model, "_reorder_cache"):  # legacy per-model hook, as HF beam search checks
        model_kwargs["cache"] = model._reorder_cache(cache, beam_rows)
    elif hasattr(cache, "reorder_cache"):
        cache.reorder_cache(beam_rows)
    else:
        raise ValueError(f"{type(cache).__name__} cannot be reordered for beam search")


@torch.no_grad()
def group_beam_search(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    **model_kwargs: Any,
) -> GenerateBeamDecoderOnlyOutput | torch.LongTensor:
    """Diverse (group) beam search; pass as ``model.generate(..., custom_generate=group_beam_search)``.

    Args:
        model: the causal LM (``generate`` passes itself).
        input_ids: ``[batch * num_beams, prompt_len]`` prompts, already expanded per beam (left-padded).
        logits_processor / stopping_criteria: as prepared by ``generate`` (max length, EOS, ...).
        generation_config: uses ``num_beams``, ``num_beam_groups``, ``diversity_penalty``, ``length_penalty``,
            ``early_stopping``, ``num_return_sequences``, ``max_length``, ``return_dict_in_generate``,
            ``output_scores``, ``output_logits`` and the prepared ``_pad_token_tensor`` / ``_eos_token_tensor``.
        synced_gpus: keep stepping until all ranks finish (FSDP / ZeRO-3).
        streamer: unsupported (beam search cannot stream), must be None.
        model_kwargs: forwarded to the model (``attention_mask``, ``position_ids``, ``cache``, ``use_cache``, ...).
    """
    if streamer is not None:
        raise ValueError("streamer cannot be used with beam search")
    num_groups, group_size = _check_config(model, generation_config)
    num_beams, penalty = generation_config.num_beams, float(generation_config.diversity_penalty or 0.0)
    want_dict = generation_config.return_dict_in_generate
    want_scores = want_dict and generation_config.output_scores
    want_logits = want_dict and generation_config.output_logits
    pad, eos = generation_config._pad_token_tensor, generation_config._eos_token_tensor
    device = input_ids.device
    batch_size, prompt_len = input_ids.shape[0] // num_beams, input_ids.shape[1]
    max_length = generation_config.max_length
    # Keep (EOS count + 1) x beams candidates (at least 2x), so enough non-finished ones remain to continue.
    num_candidates = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * group_size
    fill = int(pad) if pad is not None else (int(eos[0]) if eos is not None else 0)
    # Row layout everywhere (model inputs, cache, `scores`): prompt b, group g, beam s is row
    # b * num_beams + g * group_size + s.
    groups = _init_groups(input_ids, num_groups, group_size, max_length, fill)

    all_scores: tuple[torch.Tensor, ...] | None = () if want_scores else None
    raw_logits: tuple[torch.Tensor, ...] | None = () if want_logits else None
    cur_len, this_peer_finished, prefill_consumed = prompt_len, False, False
    outputs = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
    while model._has_unfinished_sequences(this_peer_finished, synced_gpus, device=device):
        if prefill_consumed:
            flat_inputs = torch.stack([g.running.sequences for g in groups], 1).view(-1, max_length)[:, :cur_len]
            next_len = 1 if model_kwargs.get("use_cache", True) else None
            model_inputs = model.prepare_inputs_for_generation(flat_inputs, next_sequence_length=next_len,
                                                               **model_kwargs)
            outputs = model(**model_inputs, return_dict=True)
        prefill_consumed = True
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        if synced_gpus and this_peer_finished:
            continue
        logits = outputs.logits[:, -1, :].to(copy=True, dtype=torch.float32, device=device)
        del outputs  # don't keep the (possibly huge) prefill logits alive
        log_probs = nn.functional.log_softmax(logits, dim=-1).view(batch_size, num_groups, group_size, -1)
        vocab_size = log_probs.shape[-1]

        step_scores, chosen, hits = [], [], []
        for g, group in enumerate(groups):  # sequential: group g is penalised by what groups < g just chose
            group_log_probs = log_probs[:, g]
            if penalty > 0.0 and chosen:
                group_log_probs = group_log_probs - _hamming_penalty(chosen, vocab_size, penalty)[:, None, :]
            group_inputs = group.running.sequences[:, :, :cur_len].reshape(-1, cur_len)
            group_log_probs = logits_processor(group_inputs, group_log_probs.reshape(-1, vocab_size))
            group_log_probs = group_log_probs.view(batch_size, group_size, vocab_size)
            step_scores.append(group_log_probs)
            hits.append(_advance_group(group, group_log_probs, cur_len, prompt_len, num_candidates,
                                       stopping_criteria, all_scores, generation_config))
            chosen.append(group.running.sequences[:, :, cur_len])

        if want_scores:
            all_scores += (torch.stack(step_scores, dim=1).view(batch_size * num_beams, vocab_size),)
        if want_logits:
            raw_logits += (logits,)
        step = cur_len - prompt_len
        source_rows = torch.stack([g.running.beam_indices[:, :, step] for g in groups], dim=1).view(-1)
        _reorder_cache(model, model_kwargs, source_rows)
        cur_len += 1
        for group in groups:
            _update_improvable(group, cur_len - prompt_len, max_length - prompt_len, generation_config)
        # Stop when no group can improve, when every group is full under early_stopping=True, or when every
        # candidate hit a stopping criterion (max_length).
        can_improve = torch.cat([g.improvable for g in groups]).any()
        all_full = torch.cat([g.is_finished for g in groups]).all() & (generation_config.early_stopping is True)
        this_peer_finished = bool(~can_improve | all_full | torch.cat(hits).all())

    return _finalize([g.finished for g in groups], generation_config, prompt_len, all_scores, raw_logits, model_kwargs)


def _finalize(finished: list[_Beams], config: GenerationConfig, prompt_len: int, all_scores: tuple | None,
              raw_logits: tuple | None,
              model_kwargs: dict[str, Any]) -> GenerateBeamDecoderOnlyOutput | torch.LongTensor:
    """Pick the ``num_return_sequences`` best hypotheses per prompt over all groups and crop the padding."""
    pooled = finished[0]
    for group in finished[1:]:
        pooled = _cat(pooled, group)
    best = _select(pooled, torch.topk(pooled.scores, k=config.num_return_sequences).indices)  # sorted, best first
    sequences, scores, beam_indices = (t.flatten(0, 1) for t in (best.sequences, best.scores, best.beam_indices))
    # Unused steps keep beam index -1, which tells the longest generated length.
    generated = int((beam_indices >= 0).sum(dim=1).max())
    sequences, beam_indices = sequences[:, :prompt_len + generated], beam_indices[:, :generated]
    if not config.return_dict_in_generate:
        return sequences
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences,
        sequences_scores=scores if config.output_scores else None,
        scores=all_scores,
        logits=raw_logits,
        beam_indices=beam_indices,
        cache=model_kwargs.get("cache"),
    )
