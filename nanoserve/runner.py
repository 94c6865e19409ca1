"""The model runner: the one place that sees both sides. It turns the scheduler's decision
(Python Sequence objects and token counts) into the flat tensors the model reads, runs the
model, and hands back sampled tokens and logprobs as Python values.

For each scheduled sequence with `n` new tokens, starting at `c = num_computed_tokens`:
    input_ids   += token_ids[c : c+n]        positions += c .. c+n-1
    slot_mapping += block_table[p // BS] * BS + p % BS   for each position p
    context_lens  = c + n                      query_start_loc: running sum of n
(After a context shift, token_ids means the context: the tokens from num_dropped_tokens on.)
Logits are computed only for rows that need them: the last token of a sequence whose prompt
is now complete (it samples), and prompt rows whose prompt_logprobs were asked for.

On CUDA, decode-only steps (every sequence has one new token) replay a CUDA graph captured
at warm-up for the next-larger batch size; this removes the CPU cost of launching ~10 kernels
per layer, which dominates a small GPT-2 step. By default the graphs capture fused.py's
compiled forward (the same model, fewer and larger kernels). A step that is one sequence's
prompt (up to 512 tokens) replays a graph of the eager forward. (Capture and replay:
cuda_graphs.py, a mixin of ModelRunner; read it after this file.) On a
CPU, steps that only decode up to 8 sequences skip the tensors: their host lists go straight to
a fused step (cpu_step.py's C++ or fused.py's compiled one; _launch_cpu_decode).

A step is launched (`launch`: queued on the device) and collected (`collect`: the sampled
tokens read back, the step's only host synchronisation) separately, so that the engine can
launch step k+1 before it collects step k (async scheduling). A token of step k that step k+1
feeds back is then taken from step k's output tensor on the device, never from the host.

N = tokens in this step   S = sequences in batch   MB = max blocks per sequence   V = vocab_size

References: vLLM `gpu_model_runner.py`, nano-vllm `model_runner.py`, gpt-fast (CUDA graphs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

from .attention import AttentionMetadata
from .config import EngineConfig, GPT2Config, cdiv, to_device
from .cuda_graphs import CudaGraphs
from .model import GPT2
from .sampler import Sampler, SamplerOutput
from .scheduler import SchedulerOutput
from .sequence import Sequence

if TYPE_CHECKING:
    from .fused import CpuDecodeFn


@dataclass
class StepResult:
    """What one step produced: a token (and its logprobs, if asked) per sampling sequence, in
    LaunchedStep.sample_seqs' order, and prompt logprobs keyed by seq_id."""
    tokens: list[int] = field(default_factory=list)                        # (S,) sampled token ids
    logprobs: list[dict[int, float] | None] | None = None                  # (S,) {tok: lp}, or None: nobody asked
    prompt_logprobs: dict[int, list[dict[int, float]]] = field(default_factory=dict)


@dataclass
class StepInputs:
    """The step as the model reads it, plus which rows of its output need logits."""
    input_ids: torch.Tensor     # (N,) int64
    positions: torch.Tensor     # (N,) int64
    meta: AttentionMetadata
    sample_rows: list[int] = field(default_factory=list)      # row to sample from, per sampling sequence
    sample_seqs: list[Sequence] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)      # rows whose logits give prompt logprobs
    prompt_targets: list[int] = field(default_factory=list)   # the prompt token each such row predicts
    prompt_owner: list[Sequence] = field(default_factory=list)


@dataclass
class _FlatStep:
    """The scheduled sequences flattened (ModelRunner._flatten_tokens): host lists the runner uploads."""
    input_ids: list[int] = field(default_factory=list)      # (N,)
    positions: list[int] = field(default_factory=list)      # (N,)
    slots: list[int] = field(default_factory=list)          # (N,) cache slot of each token
    qsl: list[int] = field(default_factory=lambda: [0])     # (S+1,) query_start_loc: running sum of n
    ctx_lens: list[int] = field(default_factory=list)       # (S,)
    max_query_len: int = 1
    sample_rows: list[int] = field(default_factory=list)    # row to sample from, per sampling sequence
    sample_seqs: list[Sequence] = field(default_factory=list)
    from_prev: list[tuple[int, int]] = field(default_factory=list)   # (row, row in prev.token_ids)
    scores_prompt: bool = False             # a sequence may want prompt logprobs


@dataclass
class LaunchedStep:
    """A step whose work is queued on the device. Its sampled tokens stay there, in
    `token_ids`, where the next step can read them as inputs (async scheduling), while copies
    travel to the host; `collect` waits for those copies, and only for them."""
    sched: SchedulerOutput
    sample_seqs: list[Sequence]
    token_ids: torch.Tensor | None = None    # (S,) int64 on the device
    host: list[torch.Tensor] = field(default_factory=list)   # token ids [, logprobs, their ids] on the host
    ready: torch.cuda.Event | None = None    # recorded after the copies to the host
    result: StepResult = field(default_factory=StepResult)   # prompt logprobs are filled in at launch

    @cached_property
    def row_of(self) -> dict[int, int]:
        """seq_id -> its row in token_ids (read only by a next step that feeds its tokens back)."""
        return {seq.seq_id: row for row, seq in enumerate(self.sample_seqs)}


def _upload(parts: list, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Lists (or 1-D numpy arrays) of one dtype as tensors on `device`, through one copy:
    packed into one host buffer, copied, and sliced on the device. Each slice starts 16 bytes
    after the last: Triton compiles a kernel variant per pointer alignment, and unaligned slices
    made a prefill-heavy workload recompile its attention kernels (1 s of TTFT on an H200).
    The buffer is a numpy array: filling it from Python lists costs a few microseconds a part,
    where torch.tensor(list) and a slice assignment cost ~40 (256 sequences: 0.17 ms a step)."""
    host_dtype = np.int64 if dtype == torch.int64 else np.int32
    align = 16 // np.dtype(host_dtype).itemsize                   # elements per 16 bytes
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + cdiv(len(p), align) * align)
    host = np.zeros(starts[-1], dtype=host_dtype)
    for p, a in zip(parts, starts):
        host[a:a + len(p)] = p
    dev = to_device(torch.from_numpy(host), dtype, device)
    return [dev[a:a + len(p)] for p, a in zip(parts, starts)]


class ModelRunner(CudaGraphs):
    """Turns scheduled sequences into a step on the device and its sampled tokens; the CUDA
    graphs it replays are CudaGraphs' (cuda_graphs.py)."""

    def __init__(self, model: GPT2, model_cfg: GPT2Config, cfg: EngineConfig, kv_cache: torch.Tensor,
                 sampler: Sampler, device: torch.device) -> None:
        self.model, self.model_cfg, self.cfg = model, model_cfg, cfg
        self.kv_cache = kv_cache                        # (L, 2, NB, BS, H, D)
        self.sampler, self.device = sampler, device
        self.block_size = cfg.block_size
        self.max_blocks_per_seq = cdiv(model_cfg.n_ctx, cfg.block_size)   # MB
        self.num_steps = 0                                                  # steps executed
        self.init_graphs()             # none until the engine captures them (cuda_graphs.py)
        # On a CPU the engine may set a fused decode step (cpu_step.build, for up to
        # cpu_decode_seqs = 8 sequences, or fused.compile_cpu_decode, for 1): steps that only
        # decode that many sequences hand it their host lists directly (_launch_cpu_decode).
        self.cpu_decode: CpuDecodeFn | None = None
        self.cpu_decode_seqs = 1
        # Block tables live in a host array with one row per running sequence, updated only
        # when a sequence gains a block: turning 256 Python lists into a tensor every step
        # cost more (~2 ms) than the GPU's whole decode step. numpy, not a CPU tensor: writing
        # a few ints into a numpy row takes well under a microsecond, into a tensor ~6.
        rows = cfg.max_num_seqs + 1
        self.bt_host = np.zeros((rows, self.max_blocks_per_seq), dtype=np.int32)       # (R, MB)
        self.row_of: dict[int, int] = {}         # seq_id -> row of bt_host
        self.row_len = [0] * rows                 # block ids already written in each row
        self.free_rows = list(range(rows))

    def release_rows(self, seq_ids: list[int]) -> None:
        """Sequences that finished or were preempted lost their blocks: free their rows."""
        for sid in seq_ids:
            row = self.row_of.pop(sid, None)
            if row is not None:
                self.free_rows.append(row)

    def _block_table_rows(self, sched: SchedulerOutput) -> tuple[list[int], int]:
        """Bring bt_host up to date for this step's sequences; return their rows and the
        longest block table among them (MB of this step)."""
        self.release_rows(sched.freed_seq_ids)
        rows, MB = [], 0
        for seq, _ in sched.scheduled:
            row = self.row_of.get(seq.seq_id)
            if row is None:
                row = self.row_of[seq.seq_id] = self.free_rows.pop()
                self.row_len[row] = 0
            have, bt = self.row_len[row], seq.block_table
            if len(bt) > have:   # new blocks only: holes left by a sliding window are never copied
                self.bt_host[row, have:len(bt)] = bt[have:]
                self.row_len[row] = len(bt)
            rows.append(row)
            MB = max(MB, len(bt))
        return rows, MB

    # ---- Sequences -> tensors -----------------------------------------------------------
    def prepare(self, sched: SchedulerOutput, flat: _FlatStep, prev: LaunchedStep | None = None) -> StepInputs:
        """Turn the flattened step (_flatten_tokens) into the model's inputs, in three parts: the
        tokens (ids, positions, cache slots) with each sequence's lengths, the attention
        metadata, and the rows that need logits. `prev`: the step still in flight, whose sampled
        tokens some of this step's rows take."""
        rows, MB = self._block_table_rows(sched)
        block_tables = self.bt_host[rows, :MB]                             # (S, MB) a copy
        dst, src = zip(*flat.from_prev) if flat.from_prev else ((), ())
        # Two host-to-device copies for the whole step, one per dtype: each small copy costs
        # the host ~20 us (pinning, a launch), more than at batch 1 the GPU needs for a layer.
        input_ids_d, positions_d, slots_d, dst_d, src_d = _upload(
            [flat.input_ids, flat.positions, flat.slots, dst, src], torch.int64, self.device)
        ctx_d, qsl_d, bt_d = _upload([flat.ctx_lens, flat.qsl, block_tables.reshape(-1)], torch.int32, self.device)
        meta = AttentionMetadata(
            slot_mapping=slots_d,                                           # (N,)
            block_tables=bt_d.view(-1, MB),                                 # (S, MB)
            context_lens=ctx_d,                                             # (S,)
            query_start_loc=qsl_d,                                          # (S+1,)
            max_query_len=flat.max_query_len, max_context_len=max(flat.ctx_lens),
            attention_window=self.cfg.attention_window)
        inp = StepInputs(input_ids_d, positions_d, meta, flat.sample_rows, flat.sample_seqs)
        if flat.from_prev:  # the previous step's tokens, copied on the device: the host never waits for them
            inp.input_ids[dst_d] = prev.token_ids[src_d]
        if flat.scores_prompt:
            self._select_prompt_rows(sched, flat.qsl, inp)
        return inp

    def _flatten_tokens(self, sched: SchedulerOutput, prev: LaunchedStep | None) -> _FlatStep:
        """One pass over the scheduled sequences: every sequence's next n tokens back to back,
        with their positions and cache slots (position p of a sequence lives in slot
        block_table[p // BS] * BS + p % BS), each sequence's lengths, and the rows that sample.
        A token still pending on the device (sampled by `prev`, async scheduling) gets a
        placeholder id and an entry (its row here, its row in prev.token_ids) in from_prev."""
        BS = self.block_size
        f = _FlatStep()
        input_ids, positions, slots, qsl, ctx_lens = f.input_ids, f.positions, f.slots, f.qsl, f.ctx_lens
        for seq, n in sched.scheduled:
            c, bt, row0 = seq.num_computed_tokens, seq.block_table, len(input_ids)
            i = c + seq.num_dropped_tokens               # token index; c is the position (context shifts)
            if n == 1:                                   # decode: avoid copying the token list
                P, out = seq.num_prompt_tokens, seq.output_token_ids
                if i - P >= len(out):                    # pending: its value is on the device
                    f.from_prev.append((row0, prev.row_of[seq.seq_id]))
                    input_ids.append(0)
                else:
                    input_ids.append(seq.prompt_token_ids[i] if i < P else out[i - P])
                positions.append(c)
                slots.append(bt[c // BS] * BS + c % BS)
            else:
                input_ids += seq.token_ids[i:i + n]
                positions += range(c, c + n)
                slots += [bt[p // BS] * BS + p % BS for p in range(c, c + n)]
                f.max_query_len = max(f.max_query_len, n)
            qsl.append(row0 + n)
            ctx_lens.append(c + n)                       # (S,) tokens in cache after this step's write
            if c + n == seq.num_context_tokens:          # prompt (or recompute) done: sample from the last row
                f.sample_rows.append(row0 + n - 1)
                f.sample_seqs.append(seq)
            if seq.prompt_logprobs is not None:
                f.scores_prompt = True
        return f

    def _select_prompt_rows(self, sched: SchedulerOutput, qsl: list[int], inp: StepInputs) -> None:
        """Fill inp's prompt-row lists, for sequences that asked for prompt_logprobs."""
        for (seq, n), row0 in zip(sched.scheduled, qsl):
            if seq.params.prompt_logprobs is not None and seq.prompt_logprobs is not None:
                # Row at position p predicts prompt token p+1. Skip rows already reported
                # (a preempted sequence recomputes them) and the last prompt position, whose
                # prediction is the first *generated* token.
                c = seq.num_computed_tokens
                first = max(c, len(seq.prompt_logprobs) - 1)
                for p in range(first, min(c + n, seq.num_prompt_tokens - 1)):
                    inp.prompt_rows.append(row0 + p - c)
                    inp.prompt_targets.append(seq.prompt_token_ids[p + 1])
                    inp.prompt_owner.append(seq)

    # ---- run ---------------------------------------------------------------------------
    def launch(self, sched: SchedulerOutput, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Queue the step's forward and sampling on the device and start copying the sampled
        tokens to the host; return without waiting for them (on a CPU everything has run by
        then). `prev`: the step before, if its tokens have not been read back yet."""
        self.num_steps += 1
        flat = self._flatten_tokens(sched, prev)
        if self.cpu_decode is not None and self._is_small_decode(flat):
            return self._launch_cpu_decode(sched, flat, prev)
        return self._launch_model(sched, flat, prev)

    @torch.inference_mode()
    def _launch_model(self, sched: SchedulerOutput, flat: _FlatStep, prev: LaunchedStep | None) -> LaunchedStep:
        """launch() through model.py (or its graphs), with prepare()'s tensors."""
        inp = self.prepare(sched, flat, prev)
        step = LaunchedStep(sched, inp.sample_seqs)
        graph_bs = self._graph_size(inp)
        if graph_bs is not None:
            logits = self._replay(inp, graph_bs)                            # (S, V)
        elif (T := self._prefill_graph_size(inp)) is not None:
            logits = self._replay_prefill(inp, T)                           # (1, V)
        else:
            hidden = self.model(inp.input_ids, inp.positions, self.kv_cache, inp.meta)   # (N, C)
            logits = None
            if inp.sample_rows:           # (a prefill chunk that ends no prompt samples nothing)
                logits = self.model.compute_logits(hidden[to_device(inp.sample_rows, torch.int64, self.device)])
            if inp.prompt_rows:          # reads values back now: a step that scores its prompt waits
                self._prompt_logprobs(hidden[inp.prompt_rows], inp, step.result)
        if inp.sample_seqs:
            self._send_back(step, self.sampler(logits, inp.sample_seqs))
        return step

    def _launch_cpu_decode(self, sched: SchedulerOutput, flat: _FlatStep, prev: LaunchedStep | None) -> LaunchedStep:
        """A step of a few decoding sequences on a CPU, through the fused step (cpu_decode):
        the host lists go to it as they are, without prepare()'s tensors; plain greedy
        sequences get their argmax from it, without the sampler; and it runs outside
        inference_mode (the step's tensors need no autograd). After the step has streamed the
        weights through the caches, each of those small operations costs 20-60 us, together
        ~0.3 ms of a 5-9 ms token."""
        self.release_rows(sched.freed_seq_ids)      # bt_host is not read: the tables go as lists
        for row, src in flat.from_prev:              # async scheduling: prev ran already (a CPU)
            flat.input_ids[row] = int(prev.token_ids[src])
        seqs = flat.sample_seqs
        step = LaunchedStep(sched, seqs)
        greedy = all(seq.plain_greedy for seq in seqs)
        out = self.cpu_decode(flat.input_ids, flat.positions, flat.slots, flat.ctx_lens,
                              [seq.block_table for seq, _ in sched.scheduled], self.kv_cache, greedy)
        if greedy:
            step.token_ids, step.host = out, [out]                          # (S,)
        else:
            with torch.inference_mode():
                self._send_back(step, self.sampler(out, seqs))
        return step

    def _send_back(self, step: LaunchedStep, out: SamplerOutput) -> None:
        """Keep the sampled tokens on the device for the next step and start their copy (and
        their logprobs') to the host."""
        step.token_ids = out.token_ids
        device_side = [out.token_ids] + ([out.logprobs, out.logprob_ids] if out.logprobs is not None else [])
        # non_blocking copies to the host land in pinned memory; the event marks their end.
        step.host = [t.to("cpu", non_blocking=True) for t in device_side]
        if self.device.type == "cuda":
            step.ready = torch.cuda.Event()
            step.ready.record()

    def collect(self, step: LaunchedStep) -> StepResult:
        """Wait for a launched step's sampled tokens (the step's one host synchronisation) and
        return them, with their logprobs, as Python values."""
        result = step.result
        if not step.sample_seqs:
            return result
        if step.ready is not None:
            step.ready.synchronize()
        result.tokens = step.host[0].tolist()
        if len(step.host) > 1:
            lps, ids = step.host[1].tolist(), step.host[2].tolist()
            result.logprobs = [None] * len(step.sample_seqs)
            for row, seq in enumerate(step.sample_seqs):
                k = seq.params.logprobs
                if k is not None:
                    # the top k, plus the sampled token (which may be among them)
                    result.logprobs[row] = dict(zip(ids[row][1:k + 1], lps[row][1:k + 1])) | {ids[row][0]: lps[row][0]}
        return result

    def _is_small_decode(self, flat: _FlatStep) -> bool:
        """At most cpu_decode_seqs sequences, one new token each, all sampled, no sliding window:
        what the CPU's fused decode steps take. (Such a step has no prompt logprobs to score: a
        sequence samples at a single new token only once its prompt is in the cache.)"""
        S = len(flat.ctx_lens)
        return S <= self.cpu_decode_seqs and flat.max_query_len == 1 and len(flat.sample_seqs) == S \
            and self.cfg.attention_window is None

    def _prompt_logprobs(self, hidden: torch.Tensor, inp: StepInputs, result: StepResult) -> None:
        lp = torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1)   # (P, V)
        targets = torch.tensor(inp.prompt_targets, device=lp.device)[:, None]      # (P, 1)
        target_lp = lp.gather(1, targets)[:, 0].tolist()
        k_max = max(s.params.prompt_logprobs for s in inp.prompt_owner)
        top_lp, top_ids = (x.tolist() for x in lp.topk(k_max, dim=-1)) if k_max else ([[]] * len(targets),) * 2
        for i, seq in enumerate(inp.prompt_owner):
            k = seq.params.prompt_logprobs
            d = dict(zip(top_ids[i][:k], top_lp[i][:k])) | {inp.prompt_targets[i]: target_lp[i]}
            result.prompt_logprobs.setdefault(seq.seq_id, []).append(d)
