"""The step scheduler: which sequences run in the next step, and with how many tokens each.

Continuous batching means the batch is re-decided at every step: finished sequences leave,
new ones join, and nobody waits for the slowest request of a "batch". Each step:

  1. Running sequences go first, oldest (or highest priority) first. Each asks for the tokens
     it has not computed yet: 1 for a decode, the rest of its prompt (up to the token budget)
     for a prefill. If the KV pool cannot hold them, we preempt the *youngest* running
     sequence: free its blocks and send it back to the waiting queue, to be recomputed later
     (recompute is cheaper than swapping for short GPT-2 contexts, and needs no CPU memory).
  2. If nobody was preempted, waiting sequences are admitted in priority order while the token
     budget, `max_num_seqs` and free blocks allow. A prompt longer than the remaining budget
     is split: its first chunk runs now, the rest in later steps (chunked prefill), so a long
     prompt never stalls everyone else's decode.

Prefix caching: a sequence admitted without blocks first takes the cached blocks that hold
its leading tokens (`_take_cached_prefix`) and starts computing after them; blocks that fill
up are registered for others (`computed`). A block's hash (SHA-256) covers its tokens and,
through the previous block's hash, every token before them, so equal hashes mean equal
prefixes.

Sliding window (EngineConfig.attention_window = W): after each step, a sequence frees the blocks
that lie wholly before its next query's window (`_evict`), so it holds about W / BS blocks
however long it grows. Their entries in its block table become holes (-1).

Context shifting (EngineConfig.context_overflow="shift"): a sequence about to pass n_ctx is
preempted with its front dropped (`shift`); readmitted, it recomputes its last W tokens at
positions 0..W-1. Positions, block tables and num_computed_tokens count within that context.

The scheduler is plain Python over Sequence objects and a BlockAllocator: it is tested without
a model. The "no KV cache" mode (for comparison) is one line here: every running sequence
drops its cache before each step and recomputes all its tokens.

References: vLLM v1 `Scheduler.schedule` and `KVCacheManager` (prefix caching), nano-vllm
`scheduler.py`, Sarathi-Serve (chunked prefill).
"""
from __future__ import annotations

import array
import bisect
import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

from .kv_cache import BlockAllocator
from .sequence import Sequence, SequenceStatus


class ScheduledSeq(NamedTuple):
    """One sequence's share of a step, as the scheduler decided it (see StepRecord)."""
    seq_id: int
    request_id: str
    num_computed_tokens: int   # tokens whose K/V were in the cache before this step
    num_new_tokens: int        # tokens computed in this step
    phase: str                 # "prefill" (a prompt, a chunk of one, or a recompute) or "decode"
    num_cached_tokens: int     # tokens taken from the prefix cache when admitted this step; else 0


@dataclass(frozen=True)
class StepRecord:
    """A plain copy of one step's decision, for watching the scheduler (LLMEngine.last_step)."""
    scheduled: list[ScheduledSeq]    # in the order the step runs them
    preempted_seq_ids: list[int]     # sent back to the waiting queue, their blocks freed


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    preempted: list[Sequence] = field(default_factory=list)
    freed_seq_ids: list[int] = field(default_factory=list)   # lost their blocks since the last step
    num_tokens: int = 0                                       # tokens scheduled, summed
    num_computed_before: list[int] = field(default_factory=list)      # per scheduled sequence
    num_cached_tokens: dict[int, int] = field(default_factory=dict)   # seq_id -> prefix-cache tokens
                                                                      # taken when admitted this step

    def add(self, seq: Sequence, num_tokens: int) -> None:
        """Schedule `num_tokens` of `seq` in this step (and charge them to the step's budget)."""
        self.scheduled.append((seq, num_tokens))
        self.num_computed_before.append(seq.num_computed_tokens)   # sequences change once it runs
        self.num_tokens += num_tokens

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def record(self) -> StepRecord:
        """This decision as plain values, from what was captured at schedule time."""
        rows = []
        for (seq, n), c in zip(self.scheduled, self.num_computed_before):
            phase = "decode" if is_decode(seq, c, n) else "prefill"
            rows.append(ScheduledSeq(seq.seq_id, seq.request_id, c, n, phase,
                                     self.num_cached_tokens.get(seq.seq_id, 0)))
        return StepRecord(rows, [seq.seq_id for seq in self.preempted])


def is_decode(seq: Sequence, num_computed: int, num_tokens: int) -> bool:
    """Whether computing `num_tokens` of `seq` from `num_computed` is a decode: one token past
    the prompt. A one-token chunk of a prompt is prefill; a preempted sequence recomputing its
    output one token at a time would count as decode."""
    return num_tokens == 1 and num_computed + seq.num_dropped_tokens >= seq.num_prompt_tokens


def _order(seq: Sequence) -> tuple[int, int]:
    return (seq.priority, seq.arrival_order)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_kv_cache: bool = True,
                 enable_prefix_caching: bool = False, attention_window: int | None = None) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_kv_cache = enable_kv_cache
        # Without a KV cache nothing stays computed, so there is nothing to share.
        self.enable_prefix_caching = enable_prefix_caching and enable_kv_cache
        self.attention_window = attention_window
        self.num_evicted_blocks = 0         # blocks freed because they fell behind a sliding window
        self.num_cached_tokens = 0          # tokens taken from the prefix cache instead of computed
        self.num_queried_tokens = 0         # tokens of admitted sequences looked up in the prefix cache
        self.waiting: list[Sequence] = []   # sorted by (priority, arrival_order)
        self.running: list[Sequence] = []   # sorted by (priority, arrival_order)
        self.num_preemptions = 0
        self.num_shifts = 0                 # context shifts (see shift())
        self._freed: list[int] = []         # seq ids whose blocks were freed, for the runner

    # ---- queue management -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_order)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (stopped, hit its length, or aborted) and free its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _free(self, seq: Sequence) -> None:
        self._freed.append(seq.seq_id)
        self.allocator.free(seq.block_table[seq.num_evicted_blocks:])   # holes were freed already
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_blocks = seq.num_evicted_blocks = 0

    # ---- prefix caching -------------------------------------------------------------------
    def _hash_blocks(self, seq: Sequence, num_blocks: int) -> None:
        """Extend seq.block_hashes to its first `num_blocks` full blocks of tokens. SHA-256, not
        hash(): a prompt crafted to collide with another client's would read that client's K/V."""
        BS, tokens = self.block_size, None
        for j in range(len(seq.block_hashes), num_blocks):
            tokens = tokens or seq.context_token_ids     # K/V depend on the context, not on dropped tokens
            prev = seq.block_hashes[-1] if j else b""
            seq.block_hashes.append(hashlib.sha256(prev + array.array("q", tokens[j * BS:(j + 1) * BS]).tobytes())
                                    .digest())

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """Start a sequence that holds no blocks on the cached blocks of its leading tokens.
        At least one token stays uncached: its logits are what the step is for. A sequence
        that still owes prompt logprobs needs every prompt position's logits: it takes nothing."""
        if seq.block_table or (seq.prompt_logprobs is not None
                               and len(seq.prompt_logprobs) < seq.num_prompt_tokens):
            return
        num_full = (seq.num_context_tokens - 1) // self.block_size
        self._hash_blocks(seq, num_full)
        seq.block_table = self.allocator.take_cached(seq.block_hashes[:num_full])
        seq.num_cached_blocks = len(seq.block_table)
        seq.peak_num_blocks = max(seq.peak_num_blocks, len(seq.block_table))
        seq.num_computed_tokens = len(seq.block_table) * self.block_size

    def computed(self, seq: Sequence, num_tokens: int) -> None:
        """`num_tokens` more of `seq`'s tokens have their K/V in the cache: counted as soon as
        the step that computes them is launched (the next schedule must see it; any later step
        that reads them runs after it on the device). Blocks that became full are registered,
        so later sequences can share them, and a sliding window frees what it left behind."""
        seq.num_computed_tokens += num_tokens
        self.cache_blocks(seq)
        if self.attention_window is not None:
            self._evict(seq)

    def cache_blocks(self, seq: Sequence) -> None:
        """Register `seq`'s computed blocks that are full, for the prefix cache. A block's hash
        needs its tokens' values, so a token still pending on the device (async scheduling)
        keeps its block out until the step that sampled it has been read back."""
        if not self.enable_prefix_caching or seq.num_computed_tokens // self.block_size <= seq.num_cached_blocks:
            return                      # the usual decode step: no block filled up (checked cheaply first)
        known = min(seq.num_computed_tokens, seq.num_context_tokens - seq.num_pending_tokens)
        num_full = known // self.block_size
        if num_full > seq.num_cached_blocks:
            self._hash_blocks(seq, num_full)
            for j in range(seq.num_cached_blocks, num_full):
                self.allocator.register(seq.block_table[j], seq.block_hashes[j])
            seq.num_cached_blocks = num_full

    def _evict(self, seq: Sequence) -> None:
        """Sliding window: free the blocks no later query of `seq` can see. The next query sits
        at position num_computed_tokens and sees keys from num_computed_tokens - W + 1 on, as
        does every query after it; blocks wholly before that are freed and their block-table
        entries become holes (-1), so that positions stay absolute (slot = table[p // BS])."""
        num_dead = (seq.num_computed_tokens - self.attention_window + 1) // self.block_size
        if num_dead > seq.num_evicted_blocks:
            bt = seq.block_table
            self.allocator.free(bt[seq.num_evicted_blocks:num_dead])
            self.num_evicted_blocks += num_dead - seq.num_evicted_blocks
            bt[seq.num_evicted_blocks:num_dead] = [-1] * (num_dead - seq.num_evicted_blocks)
            seq.num_evicted_blocks = num_dead

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        self.add(seq)     # back to the waiting queue; its old arrival_order puts it near the front
        self.num_preemptions += 1
        seq.num_preemptions += 1

    def shift(self, seq: Sequence, num_keep: int) -> None:
        """Context shift of a running sequence about to pass n_ctx: its context becomes its last
        `num_keep` tokens. It is preempted (blocks freed, back to the waiting queue) and, when
        readmitted, recomputes the kept tokens at positions 0..num_keep-1 like any preempted
        sequence; its earlier tokens stay in its output, but the model no longer sees them."""
        # A running sequence, or (async scheduling) one preempted while its last token was
        # still on the device: it waits with its blocks freed already.
        (self.running if seq.status == SequenceStatus.RUNNING else self.waiting).remove(seq)
        self._free(seq)
        seq.num_dropped_tokens = seq.num_tokens - num_keep
        seq.block_hashes = []           # the blocks will hold other tokens at other positions
        self.add(seq)
        self.num_shifts += 1
        seq.num_shifts += 1

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` enough blocks for `num_tokens` tokens in total; False if the pool is short."""
        need = seq.num_blocks_needed(num_tokens, self.block_size)
        if not self.allocator.can_allocate(need):
            return False
        seq.block_table.extend(self.allocator.allocate(need))
        seq.peak_num_blocks = max(seq.peak_num_blocks, len(seq.block_table) - seq.num_evicted_blocks)
        return True

    def _grow_or_preempt(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Grow a running `seq` to `num_tokens` tokens, preempting the youngest running
        sequences until the blocks fit. False if `seq` itself had to go."""
        while not self._grow(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    # ---- the policy -------------------------------------------------------------------
    def schedule(self, hold: frozenset[int] = frozenset()) -> SchedulerOutput:
        """Decide the next step: running sequences first, then (if nobody was preempted)
        waiting ones, within max_num_batched_tokens tokens and max_num_seqs sequences.
        Running sequences whose ids are in `hold` sit this step out, keeping their blocks
        (async scheduling: their pending token will end or shift them)."""
        if not self.enable_kv_cache:
            # Comparison mode: forget every cached K/V, so each step recomputes whole sequences.
            for seq in self.running:
                self._free(seq)
        out = SchedulerOutput()
        self._schedule_running(out, hold)
        if not out.preempted:           # a full pool admits nobody new
            self._schedule_waiting(out)
        out.freed_seq_ids, self._freed = self._freed, []
        return out

    def _schedule_running(self, out: SchedulerOutput, hold: frozenset[int]) -> None:
        """Each running sequence, in order, gets its next tokens: 1 for a decode, the rest of
        its prompt (up to the budget) for a prefill; preempt from the back when blocks run out."""
        i = 0
        while i < len(self.running) and (budget := self.max_num_batched_tokens - out.num_tokens) > 0:
            seq = self.running[i]
            if seq.seq_id in hold:
                i += 1
                continue
            n = min(seq.num_context_tokens - seq.num_computed_tokens, budget)
            assert n > 0, f"running sequence {seq.seq_id} has nothing to compute"
            # The usual decode fits in its last block; the check here saves a call per sequence.
            needs_blocks = seq.num_computed_tokens + n > len(seq.block_table) * self.block_size
            if needs_blocks and not self._grow_or_preempt(seq, seq.num_computed_tokens + n, out):
                return          # `seq` preempted itself: everyone after it is gone too
            out.add(seq, n)
            i += 1

    def _schedule_waiting(self, out: SchedulerOutput) -> None:
        """Admit waiting sequences in order while the budget, max_num_seqs and free blocks
        allow; the last one admitted may get only a first chunk of its prompt."""
        while (self.waiting and len(self.running) < self.max_num_seqs
               and (budget := self.max_num_batched_tokens - out.num_tokens) > 0):
            seq = self.waiting[0]
            if seq.num_pending_tokens:
                return  # preempted with a token still on the device: recompute needs its value
            if self.enable_prefix_caching:
                self._take_cached_prefix(seq)
            n = min(seq.num_context_tokens - seq.num_computed_tokens, budget)
            if not self._grow(seq, seq.num_computed_tokens + n):
                if seq.block_table:             # give the cached blocks back; retry next step
                    self._free(seq)
                return  # first come, first served: nobody overtakes the head of the queue
            if self.enable_prefix_caching:
                self.num_queried_tokens += seq.num_context_tokens
            if seq.num_cached_blocks:
                out.num_cached_tokens[seq.seq_id] = seq.num_cached_blocks * self.block_size
                self.num_cached_tokens += seq.num_cached_blocks * self.block_size
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_order)
            out.add(seq, n)
