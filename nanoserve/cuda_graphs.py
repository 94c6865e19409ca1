"""CUDA graphs: the steps whose host work would cost more than the GPU's, captured once and
replayed. A mixin of ModelRunner (runner.py), which decides per step whether a graph serves it
(_graph_size, _prefill_graph_size) and otherwise runs the model eagerly; read runner.py first.

Why: a GPT-2 decode step launches ~10 kernels a layer; at small batch the GPU finishes each in a
few microseconds and waits for the host to launch the next. A graph replays the whole step's
launches in one call (gpt-fast and vLLM do the same). Two kinds:
  - decode steps, one graph per batch size in GRAPH_SIZES (fast_paths.set_up_decode, with
    fused.py's compiled forward by default);
  - a prompt that runs alone, one graph per size in PREFILL_GRAPH_TOKENS.
A graph fixes its shapes and buffer addresses, so each replays from static buffers that the
step's inputs are copied into, padded with rows that write nothing.

S = sequences in step   G = captured batch size   T = captured prompt tokens   MB = max blocks
per sequence   V = vocab_size
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import torch

from .attention import AttentionMetadata

if TYPE_CHECKING:
    from .config import EngineConfig, GPT2Config
    from .fused import DecodeFn
    from .model import GPT2
    from .runner import StepInputs


def _smallest_fit(sizes: list[int], n: int) -> int | None:
    """The smallest of the sorted captured sizes that holds n, or None."""
    return next((size for size in sizes if size >= n), None)


class CudaGraphs:
    """ModelRunner's graphs. It provides model, model_cfg, cfg, kv_cache, device and
    max_blocks_per_seq."""
    model: GPT2
    model_cfg: GPT2Config
    cfg: EngineConfig
    kv_cache: torch.Tensor
    device: torch.device
    max_blocks_per_seq: int

    def init_graphs(self) -> None:
        """No graphs yet: the engine captures them once the model and the pool exist."""
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}                   # batch size -> graph
        # What the decode graphs capture: None = the eager forward + logits; the engine may set
        # fused.compile_decode(model), the same forward compiled (fewer, larger kernels).
        self.decode_logits: DecodeFn | None = None
        self.graph_bufs: dict[str, torch.Tensor] = {}
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}           # prompt tokens -> graph

    # ---- decode steps ----------------------------------------------------------------------
    # A decode step of S sequences has a fixed shape: N = S tokens, query_start_loc = 0..S.
    # We capture the model forward + logits once per batch size G in GRAPH_SIZES into static
    # buffers; a step of S <= G sequences copies its inputs into the first S rows, pads the
    # rest with harmless dummies (slot -1: no cache write; context 1 over block 0), replays,
    # and reads the first S rows of logits. The attention kernels take every length from
    # device tensors, so one graph serves any context lengths.
    GRAPH_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]

    def capture_cuda_graphs(self) -> None:
        sizes = [g for g in self.GRAPH_SIZES if g <= self.cfg.max_num_seqs]
        if not sizes or sizes[-1] < self.cfg.max_num_seqs:
            sizes.append(self.cfg.max_num_seqs)
        G, MB, dev = sizes[-1], self.max_blocks_per_seq, self.device
        b = self.graph_bufs = dict(
            input_ids=torch.zeros(G, dtype=torch.int64, device=dev),
            positions=torch.zeros(G, dtype=torch.int64, device=dev),
            slot_mapping=torch.full((G,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros(G, MB, dtype=torch.int32, device=dev),
            context_lens=torch.ones(G, dtype=torch.int32, device=dev),
            query_start_loc=torch.arange(G + 1, dtype=torch.int32, device=dev),
        )
        self.graph_logits: dict[int, torch.Tensor] = {}
        self.graphs = {}
        decode = self.decode_logits or (lambda ids, pos, kv, meta: self.model.compute_logits(self.model(ids, pos, kv, meta)))
        self.graph_pool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for g in reversed(sizes):          # largest first, so smaller ones reuse its memory
                meta = AttentionMetadata(slot_mapping=b["slot_mapping"][:g], block_tables=b["block_tables"][:g],
                                         context_lens=b["context_lens"][:g], query_start_loc=b["query_start_loc"][:g + 1],
                                         max_query_len=1, max_context_len=self.model_cfg.n_ctx,
                                         attention_window=self.cfg.attention_window)
                self.graphs[g], self.graph_logits[g] = self._capture(                   # logits (g, V)
                    lambda: decode(b["input_ids"][:g], b["positions"][:g], self.kv_cache, meta))
        torch.cuda.synchronize()
        self.graph_sizes = sorted(self.graphs)
        logging.getLogger("nanoserve").info("captured %d CUDA graphs (batch sizes %s, %s decode) in %.1fs",
                                            len(sizes), sizes, "fused" if self.decode_logits else "eager",
                                            time.perf_counter() - t0)

    def _capture(self, fwd: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Run fwd once (warm-up: Triton compiles, cuBLAS picks kernels), then capture it into a
        graph in the shared pool: the graph and the output tensor its replays overwrite."""
        fwd()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            out = fwd()
        return graph, out

    def _graph_size(self, inp: StepInputs) -> int | None:
        """The smallest captured batch size that fits this step, if it is a pure decode step."""
        S = len(inp.sample_seqs)
        if not self.graphs or not inp.meta.is_decode or inp.prompt_rows or S != inp.meta.num_seqs:
            return None
        return _smallest_fit(self.graph_sizes, S)

    def _replay(self, inp: StepInputs, g: int) -> torch.Tensor:
        b, m, S = self.graph_bufs, inp.meta, inp.meta.num_seqs
        b["input_ids"][:S].copy_(inp.input_ids)
        b["positions"][:S].copy_(inp.positions)
        b["slot_mapping"][:S].copy_(m.slot_mapping)
        b["block_tables"][:S, :m.block_tables.shape[1]].copy_(m.block_tables)
        b["context_lens"][:S].copy_(m.context_lens)
        if g > S:                                 # padding rows: write nothing, read one slot
            b["slot_mapping"][S:g].fill_(-1)
            b["context_lens"][S:g].fill_(1)
            b["block_tables"][S:g, 0].fill_(0)
        self.graphs[g].replay()
        return self.graph_logits[g][:S]                                               # (S, V)

    # ---- CUDA graphs for one sequence's prompt ---------------------------------------------
    # A prompt that runs alone (a chat user's first token; the latency workload) is a step of
    # one sequence and a few dozen tokens. On GPT-2 XL the GPU needs about 2 ms for it, and the
    # eager forward's ~600 launches took the host ~15 ms (the TTFT). So we also capture the eager
    # forward of one sequence with T tokens, for each T in PREFILL_GRAPH_TOKENS, plus the logits
    # of one row. A step of n <= T tokens fills the first n rows and pads the rest (slot -1: no
    # cache write; attention gives those rows zeros, and nothing reads them); the row to sample
    # from (n - 1) is a device tensor too, so the graph serves any n, any cached prefix before
    # it (context_lens and query_start_loc are read on the device) and any block table.
    PREFILL_GRAPH_TOKENS = [16, 32, 64, 128, 256, 512]

    def capture_prefill_graphs(self) -> None:
        """Capture PREFILL_GRAPH_TOKENS' graphs (after capture_cuda_graphs: they share its pool)."""
        sizes = [T for T in self.PREFILL_GRAPH_TOKENS if T <= self.model_cfg.n_ctx]
        if not sizes:
            return
        dev, T_max = self.device, sizes[-1]
        b = self.prefill_bufs = dict(
            input_ids=torch.zeros(T_max, dtype=torch.int64, device=dev),
            positions=torch.zeros(T_max, dtype=torch.int64, device=dev),
            slot_mapping=torch.full((T_max,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros(1, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
            context_lens=torch.ones(1, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=dev),
            last_row=torch.zeros(1, dtype=torch.int64, device=dev),
        )
        self.prefill_logits: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            for T in reversed(sizes):
                meta = AttentionMetadata(slot_mapping=b["slot_mapping"][:T], block_tables=b["block_tables"],
                                         context_lens=b["context_lens"], query_start_loc=b["query_start_loc"],
                                         max_query_len=T, max_context_len=self.model_cfg.n_ctx,
                                         attention_window=self.cfg.attention_window)
                self.prefill_graphs[T], self.prefill_logits[T] = self._capture(         # logits (1, V)
                    lambda: self.model.compute_logits(self.model(b["input_ids"][:T], b["positions"][:T], self.kv_cache,
                                                                 meta).index_select(0, b["last_row"])))
        torch.cuda.synchronize()

    def _prefill_graph_size(self, inp: StepInputs) -> int | None:
        """The smallest captured prompt graph that fits this step: one sequence that samples,
        N tokens, no prompt logprobs."""
        if not self.prefill_graphs or inp.meta.num_seqs != 1 or len(inp.sample_seqs) != 1 \
                or inp.prompt_rows:
            return None
        return _smallest_fit(sorted(self.prefill_graphs), inp.input_ids.shape[0])

    def _replay_prefill(self, inp: StepInputs, T: int) -> torch.Tensor:
        b, m, N = self.prefill_bufs, inp.meta, inp.input_ids.shape[0]
        b["input_ids"][:N].copy_(inp.input_ids)
        b["positions"][:N].copy_(inp.positions)
        b["slot_mapping"][:N].copy_(m.slot_mapping)
        b["slot_mapping"][N:T].fill_(-1)                 # padding rows write nothing
        b["block_tables"][:, :m.block_tables.shape[1]].copy_(m.block_tables)
        b["context_lens"].copy_(m.context_lens)
        b["query_start_loc"].copy_(m.query_start_loc)
        b["last_row"].fill_(inp.sample_rows[0])
        self.prefill_graphs[T].replay()
        return self.prefill_logits[T]                                                 # (1, V)
