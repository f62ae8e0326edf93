"""How each sequence picks its tokens: its options, built once when it starts, with transformers' meaning.

Sequences in one batch may ask for different things (greedy or sampled, their own temperature, top-k, seed, banned
words...). The common options become values of a row in the batch's tensors and are applied for the whole batch at
once (``choice``); the rare ones that read a sequence's own token ids keep transformers' logits processors, applied to
that sequence's unpadded ids, so a sequence gets the same tokens alone or in a batch. OpenAI's presence and frequency
penalties, which transformers does not have, are one small processor of the same kind here (``OpenAIPenalties``).

The log-probabilities a request asks for (``/chat``'s ``output_scores``, OpenAI's ``logprobs`` and
``top_logprobs``) are taken from the scores the token was chosen from, for every route alike.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from itertools import chain
from typing import Callable, Sequence, TypeVar

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    EncoderNoRepeatNGramLogitsProcessor,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteria, StopStringCriteria

from ...errors import PredictorError, UnsupportedOption
from .. import faults
from .grammar import GrammarMask, grammar_support_error
from ..options import GenerationOptions

logger = logging.getLogger(__name__)
T = TypeVar("T")

# temperature, top_h, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff
WarpKey = tuple[float, float, int, float, float, float, float, float]
LOWEST_LOGPROB = -9999.0  # reported for a token that cannot be chosen (-inf is not JSON), as vLLM does


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and, when asked, the most likely tokens' at that step, best first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, over the tokens generated so far (not the prompt):
    ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``."""

    def __init__(self, prompt_len: int, presence_penalty: float, frequency_penalty: float) -> None:
        self.prompt_len = prompt_len
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len:]  # [rows, new]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency_penalty * counts - self.presence_penalty * (counts > 0).to(scores.dtype)


class TextStopCriteria(StoppingCriteria):
    """Stop strings matched on decoded text, for the vocabularies transformers' ``StopStringCriteria`` cannot read
    (a word-level tokenizer, whose decoder puts spaces between tokens). Same meaning: a row stops after the token
    that completes a stop string, which stays in the text. Only the last ``maximum_token_len`` tokens are decoded:
    a stop string of n characters that ends in the last token spans at most n tokens, one more gives the decoder
    its context."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.maximum_token_len = max(map(len, self.stop_strings)) + 1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor | None, **kwargs) -> torch.BoolTensor:
        tails = input_ids[:, -self.maximum_token_len:].tolist()  # [rows, tail]
        return torch.tensor([self._completed(tail) for tail in tails], dtype=torch.bool, device=input_ids.device)

    def _completed(self, tail: list[int]) -> bool:
        # Counted rather than located: a word-level decoder's text for fewer tokens need not be a prefix of its
        # text for more, but a stop string the last token completed is one more occurrence either way.
        text, before = self.tokenizer.decode(tail), self.tokenizer.decode(tail[:-1])
        return any(text.count(stop) > before.count(stop) for stop in self.stop_strings)


@dataclass(frozen=True)
class RowOptions:
    """A sequence's options as values of its row in the batch's tensors; neutral values leave its scores alone."""

    temperature: float = 1.0
    top_k: int = 0
    top_p_drop: float = 0.0  # 1 - top_p, computed as transformers' ``TopPLogitsWarper`` does
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    rare_warp: bool = False  # top-h, epsilon or eta: the row is warped by transformers' own warpers

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class SequenceSampler:
    """How one sequence picks its tokens; built once when the sequence starts."""

    prompt_len: int
    min_new_tokens: int
    eos_token_ids: tuple[int, ...]
    processors: LogitsProcessorList  # the rare ones that read the sequence's token ids, in generate's order
    warp_key: WarpKey | None  # None: greedy
    row_options: RowOptions
    generator: torch.Generator | None  # set when the request gave a seed
    logprobs: bool
    top_logprobs: int = 0
    stop_strings: StopStringCriteria | TextStopCriteria | None = None  # see ``stop_string_criteria``



def stopped_on_strings(samplers: Sequence[SequenceSampler], sequences: Sequence[list[int]]) -> list[bool]:
    """Whether each sequence now ends with one of its stop strings: one matcher call for all the sequences that
    share a set of stop strings (the matcher is kept per set), hold at least its tail of tokens and whose last token
    can end one of the strings."""
    stopped = [False] * len(samplers)
    groups: dict[int, list[int]] = {}
    for i, (sampler, tokens) in enumerate(zip(samplers, sequences)):
        matcher = sampler.stop_strings
        if matcher is not None and len(tokens) > sampler.prompt_len:
            ending = ending_tokens(matcher)
            if ending is None or tokens[-1] in ending:  # most rows, most steps: their token cannot end a string
                groups.setdefault(id(matcher), []).append(i)
    for rows in groups.values():
        matcher = samplers[rows[0]].stop_strings
        tail = matcher.maximum_token_len
        full = [i for i in rows if len(sequences[i]) >= tail]
        parts = [full] if full else []
        parts += [[i] for i in rows if len(sequences[i]) < tail]  # shorter than the tail: each alone, unpadded
        for part in parts:
            # [rows, tail]: all the matcher reads (a flat list makes the tensor twice as fast as nested ones)
            ids = torch.tensor(list(chain.from_iterable(sequences[i][-tail:] for i in part))).view(len(part), -1)
            for i, hit in zip(part, matcher(ids, None).tolist()):
                stopped[i] = bool(hit)
    return stopped


@functools.lru_cache(maxsize=64)
def ending_tokens(matcher: StoppingCriteria) -> frozenset[int] | None:
    """The ids that can be the last token of one of ``matcher``'s stop strings, None when any can (a text matcher).
    transformers' matcher stops a row only when its last token holds the end of a string (an end overlap above 0 in
    its table, its own ``initial_match``), so a row whose last token is not among these is not stopped: it need
    not be matched."""
    if not isinstance(matcher, StopStringCriteria):
        return None
    first = matcher.max_valid_positions * matcher.num_stop_strings  # the table's columns: positions, ends, length
    end_overlaps = torch.as_tensor(matcher.embedding_vec)[:, first:-1]
    return frozenset((end_overlaps > 0).any(dim=-1).nonzero().flatten().tolist())


def make_sampler(options: GenerationOptions, prompt_ids: list[int], sequence_index: int, device: torch.device,
                 tokenizer: PreTrainedTokenizerBase) -> SequenceSampler:
    """The sampler for sequence ``sequence_index`` of a request (several with num_return_sequences); stop strings
    and grammars read the ``tokenizer``'s vocabulary."""
    reads_ids = _reads_ids(options) or options.grammar is not None
    processors = _id_processors(options, prompt_ids, device) if reads_ids else LogitsProcessorList()
    if options.grammar is not None:  # its state: this sequence's
        processors.append(_option("grammar", prompt_ids, lambda: _grammar_mask(options.grammar, tokenizer, prompt_ids)))
    generator = None
    if options.seed is not None and options.do_sample:
        generator = torch.Generator(device=device).manual_seed(sequence_seed(options.seed, sequence_index))
    warp_key = (options.temperature, options.top_h, options.top_k, options.top_p, options.min_p, options.typical_p,
                options.epsilon_cutoff, options.eta_cutoff) if options.do_sample else None
    row = _row_options(options, batched_penalties=not reads_ids)
    if row.penalized:  # built as its processor would be: a failure is the option's (a 422 naming it)
        name = ("repetition_penalty" if options.repetition_penalty != 1.0
                else "presence_penalty" if options.presence_penalty else "frequency_penalty")
        row = _option(name, prompt_ids, lambda: row)
    stops = None
    if options.stop_strings:
        stops = _option("stop_strings", prompt_ids, lambda: stop_string_criteria(tokenizer, options.stop_strings))
    return SequenceSampler(prompt_len=len(prompt_ids), min_new_tokens=options.min_new_tokens,
                           eos_token_ids=options.eos_token_ids, processors=processors, warp_key=warp_key,
                           row_options=row, generator=generator, logprobs=options.logprobs,
                           top_logprobs=options.top_logprobs, stop_strings=stops)


def _reads_ids(options: GenerationOptions) -> bool:
    """Whether a rare option that reads the sequence's ids is set (then its penalties run in the same list; a
    grammar is one too)."""
    return bool(options.sequence_bias or options.no_repeat_ngram_size or options.encoder_no_repeat_ngram_size
                or options.bad_words_ids or options.forced_bos_token_id is not None or options.forced_eos_token_id
                or options.remove_invalid_values or options.exponential_decay_length_penalty is not None
                or options.suppress_tokens or options.begin_suppress_tokens)


def _row_options(options: GenerationOptions, batched_penalties: bool) -> RowOptions:
    """The batched values of a sequence's options: its warpers when it samples, its penalties unless its own
    processors apply them; ``1 - top_p`` in double precision, as transformers computes it."""
    penalties = dict(repetition_penalty=options.repetition_penalty, presence_penalty=options.presence_penalty,
                     frequency_penalty=options.frequency_penalty) if batched_penalties else {}
    if not options.do_sample:
        return RowOptions(**penalties)
    return RowOptions(temperature=options.temperature, top_k=options.top_k, top_p_drop=1 - options.top_p,
                      min_p=options.min_p, typical_p=options.typical_p, **penalties,
                      rare_warp=options.top_h < 1.0 or 0.0 < options.epsilon_cutoff < 1.0
                      or 0.0 < options.eta_cutoff < 1.0)


def _option(option: str, prompt_ids: Sequence[int], build: Callable[[], T]) -> T:
    """What ``build`` makes for ``option``; if it raises, the request's option is at fault: a 422 naming it (the
    cause is logged, not sent)."""
    try:
        faults.inject(option, prompt_ids)
        return build()
    except PredictorError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is this request's, not the worker's
        logger.error("Building %s for a request failed", option, exc_info=exc)
        raise UnsupportedOption(f"{option}: this model could not apply the value given ({type(exc).__name__})",
                                param=option) from exc


def _grammar_mask(grammar: str, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int]) -> GrammarMask:
    if (error := grammar_support_error(tokenizer)) is not None:
        raise UnsupportedOption(f"structured output is not available for this model: {error}", param="grammar")
    return GrammarMask(grammar, tokenizer, len(prompt_ids))


@functools.lru_cache(maxsize=4)
def token_stop_matching_error(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why transformers' ``StopStringCriteria`` cannot match stop strings on this tokenizer's token ids (None: it
    can), in which case ``stop_string_criteria`` matches them on decoded text."""
    try:
        # Reads the whole vocabulary, whatever the string; eos is a token of every vocabulary, so a failure here is
        # the vocabulary's, not the string's.
        StopStringCriteria(tokenizer, [tokenizer.eos_token or "e"])
    except Exception as exc:  # noqa: BLE001 - transformers' clean_tokenizer_vocab expects each token to decode
        # the same after a prefix; a word-level decoder puts a space between them (ValueError: substring not found)
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=64)
def stop_string_criteria(tokenizer: PreTrainedTokenizerBase,
                         stop_strings: tuple[str, ...]) -> StopStringCriteria | TextStopCriteria:
    """The stop-string matcher for ``stop_strings``: transformers' own on token ids where it can read the
    vocabulary, else one on decoded text. Kept per set of strings: building transformers' reads and sorts the whole
    vocabulary (tens of milliseconds for Falcon's), on the thread that runs the batch. Matching keeps no state."""
    if token_stop_matching_error(tokenizer) is None:
        try:
            return StopStringCriteria(tokenizer, list(stop_strings))
        except ValueError:  # a string no token can produce: it never matches, on text as on ids
            pass
    return TextStopCriteria(tokenizer, stop_strings)


def _id_processors(options: GenerationOptions, prompt_ids: list[int], device: torch.device) -> LogitsProcessorList:
    """The processors that read the sequence's ids, in the order ``generate`` applies them; each is built by
    ``_option``, so one that cannot be built fails its request with its option's name."""
    processors = LogitsProcessorList()

    def add(option: str, build: Callable[[], LogitsProcessor]) -> None:
        processors.append(_option(option, prompt_ids, build))

    eos = list(options.eos_token_ids)
    if options.sequence_bias:
        add("sequence_bias",
            lambda: SequenceBiasLogitsProcessor([[list(ids), bias] for ids, bias in options.sequence_bias]))
    if options.repetition_penalty != 1.0:
        add("repetition_penalty", lambda: RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if options.no_repeat_ngram_size > 0:
        add("no_repeat_ngram_size", lambda: NoRepeatNGramLogitsProcessor(options.no_repeat_ngram_size))
    if options.encoder_no_repeat_ngram_size > 0:
        # On a decoder-only model the "encoder input" is the prompt: its n-grams may not be repeated.
        add("encoder_no_repeat_ngram_size", lambda: EncoderNoRepeatNGramLogitsProcessor(
            options.encoder_no_repeat_ngram_size, torch.tensor([prompt_ids], device=device)))
    if options.bad_words_ids:
        add("bad_words_ids",
            lambda: NoBadWordsLogitsProcessor([list(w) for w in options.bad_words_ids], eos or None))
    if options.forced_bos_token_id is not None:
        add("forced_bos_token_id", lambda: ForcedBOSTokenLogitsProcessor(options.forced_bos_token_id))
    if options.forced_eos_token_id:
        add("forced_eos_token_id", lambda: ForcedEOSTokenLogitsProcessor(
            len(prompt_ids) + options.max_new_tokens, list(options.forced_eos_token_id), device=device))
    if options.remove_invalid_values:
        add("remove_invalid_values", InfNanRemoveLogitsProcessor)
    if options.exponential_decay_length_penalty is not None:
        add("exponential_decay_length_penalty", lambda: ExponentialDecayLengthPenalty(
            options.exponential_decay_length_penalty, eos, len(prompt_ids)))
    if options.suppress_tokens:
        add("suppress_tokens", lambda: SuppressTokensLogitsProcessor(list(options.suppress_tokens), device=device))
    if options.begin_suppress_tokens:
        # generate's first-token index: one later when a forced bos token follows a one-token prompt
        begin = len(prompt_ids) + (len(prompt_ids) == 1 and options.forced_bos_token_id is not None)
        add("begin_suppress_tokens", lambda: SuppressTokensAtBeginLogitsProcessor(
            list(options.begin_suppress_tokens), begin, device=device))
    if options.presence_penalty or options.frequency_penalty:
        add("presence_penalty" if options.presence_penalty else "frequency_penalty", lambda: OpenAIPenalties(
            len(prompt_ids), options.presence_penalty, options.frequency_penalty))
    return processors


def sequence_seed(seed: int, sequence_index: int) -> int:
    """The seed of sequence ``sequence_index`` of a request: distinct per sequence, and unlike ``seed + index``
    not the seed another request's first sequence would use."""
    return (seed * 1_000_003 + sequence_index * 7_919) % 2**63


def warp(scores: torch.Tensor, key: WarpKey) -> torch.Tensor:
    """transformers' sampling warpers, in generate's order (for the rows whose warpers are not batched)."""
    temperature, top_h, top_k, top_p, min_p, typical_p, epsilon, eta = key
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_h < 1.0:
        scores = TopHLogitsWarper(top_h)(None, scores)
    if top_k != 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(None, scores)
    if typical_p < 1.0:
        scores = TypicalLogitsWarper(typical_p)(None, scores)
    if 0.0 < epsilon < 1.0:
        scores = EpsilonLogitsWarper(epsilon)(None, scores)
    if 0.0 < eta < 1.0:
        scores = EtaLogitsWarper(eta, device=scores.device)(None, scores)
    return scores


def token_logprobs(scores: torch.Tensor, tokens: torch.Tensor, samplers: list[SequenceSampler],
                   wanted: Sequence[int]) -> list[TokenLogprob | None]:
    """The chosen tokens' log-probabilities (and the top ones') under the distribution they were chosen from, for
    the ``wanted`` rows (None for the others)."""
    values: list[TokenLogprob | None] = [None] * len(samplers)
    index = torch.tensor(list(wanted), device=scores.device)
    logprobs = scores[index].log_softmax(dim=-1).nan_to_num(nan=-torch.inf).clamp(min=LOWEST_LOGPROB)  # [rows, vocab]
    picked = logprobs.gather(1, tokens[index].unsqueeze(1)).squeeze(1).tolist()
    most = max(samplers[row].top_logprobs for row in wanted)
    best_values, best_ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0])
    for i, row in enumerate(wanted):
        k = samplers[row].top_logprobs
        top = tuple(zip(best_ids[i, :k].tolist(), best_values[i, :k].tolist()))
        values[row] = TokenLogprob(picked[i], top)
    return values


def prompt_token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each of ``tokens``' log-probability under the model's own distribution at the position before it (``logits``
    [len(tokens), vocab]: raw next-token logits, no processor applied), and the ``top`` most likely tokens'."""
    logprobs = logits.float().log_softmax(dim=-1).clamp(min=LOWEST_LOGPROB)  # [tokens, vocab]
    picked = logprobs.gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
    best_values, best_ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0])
    return [TokenLogprob(value, tuple(zip(ids, values)))
            for value, ids, values in zip(picked, best_ids.tolist(), best_values.tolist())]
