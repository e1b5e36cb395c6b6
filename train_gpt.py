"""
Parameter Golf entry: train the best GPT that fits a 16,000,000-byte artifact in 600 s on 8xH100.

  torchrun --standalone --nproc_per_node=8 train_gpt.py

Every knob is an environment variable (see Hyperparameters). The run trains, averages the weights
(EMA/SWA), collects GPTQ Hessians and weight sensitivities from training tokens inside the time budget,
quantizes the weights to per-group integer widths (int6/int7 by default) with GPTQ at std-based clips
spread over the matrices by sensitivity, packs them with zstd or lzma, rebuilds a fresh model from that
file alone and scores it with score-first test-time training: each document alone with its own LoRA
adapters, the whole model trained on each third of the text once it is scored (TTT_EPOCHS=0 TTT_LORA_RANK=0:
the exact stride-64 sliding-window evaluator instead). The last line of the log is the score of the
round-tripped model.
"""
from __future__ import annotations

import copy
import datetime
import difflib
import json
import lzma
import math
import os
import random
import signal
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    import zstandard
except ImportError:  # lzma alone still packs the model; the log says so
    zstandard = None
try:
    from flash_attn_interface import flash_attn_func as flash_attn_3
except ImportError:
    flash_attn_3 = None
try:  # ships with CUDA builds of torch; without it (or before 3.3) the model runs its plain PyTorch path
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    triton = None

ARTIFACT_CAP_BYTES = 16_000_000

# Inductor's "mix-order reduction" fuses the embedding's gradient with the column sums of the per-channel
# gains into one kernel that ran at a tenth of memory bandwidth: 105 ms of each step on H100
# (tools/bench.py profile). Turning it off took the bare step from 708 to 629 ms (tools/bench.py step).
if hasattr(inductor_config.triton, "mix_order_reduction"):
    inductor_config.triton.mix_order_reduction = False


class SetupError(Exception):
    """A bad input or setting: reported as one line saying what is wrong and how to fix it."""


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    on the way out swallows it; main() marks the log as not finished as it passes."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def raise_stopped(signum, frame):
    raise Stopped(signum)


# -----------------------------------------------------------------------------
# Hyperparameters

# Every setting is read by env(NAME, default, range), which checks the value against its range at once, before
# anything heavy runs. Ranges that involve several settings are checked at the end of Hyperparameters, the
# ones that need the validation split by check_against_val_split. A new setting needs a range here and a
# bad example in tests/test_bad_settings.py.

_SETTINGS: dict[str, object] = {}


class Range:
    """The values a setting may take: a test, and the words the error line uses for them. A test may
    also raise SetupError itself, with a sharper message (QUANT_BITS)."""

    def __init__(self, words: str, test):
        self.words, self.test = words, test


def at_least(low) -> Range:
    return Range(f"a value >= {low}", lambda v: low <= v < math.inf)  # `< inf` also turns away inf and nan


def above(low) -> Range:
    return Range(f"a value > {low}", lambda v: low < v < math.inf)


def between(low, high) -> Range:
    return Range(f"a value in [{low}, {high}]", lambda v: low <= v <= high)


def one_of(*values) -> Range:
    return Range("one of " + ", ".join(map(str, values)), lambda v: v in values)


def off_or(allowed: Range) -> Range:
    return Range(f"0 (off) or {allowed.words}", lambda v: v == 0 or allowed.test(v))


# At 1 an average would never move and a momentum would grow without end.
DECAY = Range("a value in [0, 1)", lambda v: 0 <= v < 1)
# A newline in a setting would forge lines of train.log (a fake final_score, say).
TEXT = Range("one line of printable text", str.isprintable)
NONEMPTY_TEXT = Range("one line of printable text, not empty", lambda v: v != "" and v.isprintable())


def env(name: str, default, allowed: Range):
    """Read one setting from the environment, typed like its default, check it against its range, and
    remember it for the log."""
    raw = os.environ.get(name)
    value = default
    if raw is not None:
        try:
            value = type(default)(raw)
        except ValueError:
            try:  # an int setting may be written 1e6 or 786432.0, but not 1.5
                number = float(raw)
            except ValueError:
                number = math.nan
            if not isinstance(default, int) or not math.isfinite(number):
                raise SetupError(f"{name}={raw!r} is not a valid {type(default).__name__}") from None
            if number != int(number):
                raise SetupError(f"{name}={raw!r} must be a whole number") from None
            value = int(number)
    if not allowed.test(value):
        raise SetupError(f"{name}={value!r} is not allowed: use {allowed.words}")
    _SETTINGS[name] = value
    return value


class Hyperparameters:
    """Every knob, read from the environment when constructed; see README.md for the table."""

    def __init__(self):
        # Data and run identity.
        self.data_path = env("DATA_PATH", "./data/datasets/fineweb10B_sp8192", NONEMPTY_TEXT)
        self.tokenizer_path = env("TOKENIZER_PATH", "./data/tokenizers/fineweb_8192_bpe.model", NONEMPTY_TEXT)
        self.run_id = env("RUN_ID", uuid.uuid4().hex[:8], NONEMPTY_TEXT)
        self.out_dir = env("OUT_DIR", ".", NONEMPTY_TEXT)
        self.seed = env("SEED", 1337, between(0, 2**32 - 1))  # what numpy takes

        # Model.
        self.vocab_size = env("VOCAB_SIZE", 8192, between(2, 65536))  # shards hold uint16 token ids
        self.num_layers = env("NUM_LAYERS", 11, at_least(1))
        self.model_dim = env("MODEL_DIM", 512, at_least(2))
        self.num_heads = env("NUM_HEADS", 8, at_least(1))
        self.num_kv_heads = env("NUM_KV_HEADS", 4, at_least(1))
        self.mlp_mult = env("MLP_MULT", 4.0, above(0))
        self.rope_base = env("ROPE_BASE", 10000.0, above(1))
        self.qk_gain_init = env("QK_GAIN_INIT", 5.0, above(0))
        self.logit_softcap = env("LOGIT_SOFTCAP", 30.0, above(0))
        self.bigram_vocab_size = env("BIGRAM_VOCAB_SIZE", 0, off_or(at_least(2)))  # 1: only the starts' bucket
        self.bigram_dim = env("BIGRAM_DIM", 128, at_least(1))
        self.tied_embed_init_std = env("TIED_EMBED_INIT_STD", 0.005, above(0))
        self.smear_gate = env("SMEAR_GATE", 0, one_of(0, 1))  # blend each token's embedding with its predecessor's
        self.rope_dims = env("ROPE_DIMS", 16, at_least(0))  # partial RoPE: rotate this many of each head's dims; 0: all
        self.xsa_last_n = env("XSA_LAST_N", 11, at_least(0))  # exclusive self-attention in the last N layers (all if more)
        self.ln_scale = env("LN_SCALE", 1, one_of(0, 1))  # 1: block i's normalized inputs times 1/sqrt(i+1)
        self.parallel_last_n = env("PARALLEL_LAST_N", 4, at_least(0))  # the last N blocks run attention and MLP side by side
        self.mlp_neg_slope = env("MLP_NEG_SLOPE", 0.5, between(0, 1))  # MLP activation leaky_relu(., slope)^2; 0: relu^2
        self.skip_gates = env("SKIP_GATES", 1, one_of(0, 1))  # 1: U-Net skips enter through learned sigmoid gates
        self.loop_first = env("LOOP_FIRST", 3, at_least(0))  # depth recurrence: blocks LOOP_FIRST..LOOP_LAST run
        self.loop_last = env("LOOP_LAST", 5, at_least(0))
        self.loop_repeats = env("LOOP_REPEATS", 0, at_least(0))  # ... this many extra times; 0: off (scored better)
        self.loop_start_frac = env("LOOP_START_FRAC", 0.35, between(0, 1))  # ... from this fraction of training on

        # Training length and batch.
        self.train_seq_len = env("TRAIN_SEQ_LEN", 2048, at_least(1))
        self.train_batch_tokens = env("TRAIN_BATCH_TOKENS", 786_432, at_least(1))  # one whole step, over all ranks
        self.grad_accum_steps = env("GRAD_ACCUM_STEPS", 0, at_least(0))  # micro-steps per step; 0: 8 / WORLD_SIZE
        self.iterations = env("ITERATIONS", 20000, at_least(1))
        self.warmup_steps = env("WARMUP_STEPS", 20, at_least(0))  # compile warm-up, undone before the clock starts
        self.lr_warmup_steps = env("LR_WARMUP_STEPS", 20, at_least(0))
        self.warmdown_iters = env("WARMDOWN_ITERS", 3000, at_least(0))
        self.warmdown_frac = env("WARMDOWN_FRAC", 0.72, between(0, 1))  # > 0: warmdown over this last fraction, not WARMDOWN_ITERS
        self.lr_floor = env("LR_FLOOR", 0.0, between(0, 1))  # the warmdown ends at this multiple of the LR instead of 0
        self.max_wallclock_seconds = env("MAX_WALLCLOCK_SECONDS", 600.0, at_least(0))  # 0: no cap

        # Optimizers.
        self.matrix_lr = env("MATRIX_LR", 0.022, at_least(0))
        self.scalar_lr = env("SCALAR_LR", 0.02, at_least(0))
        self.tied_embed_lr = env("TIED_EMBED_LR", 0.03, at_least(0))
        self.muon_momentum = env("MUON_MOMENTUM", 0.97, DECAY)
        self.muon_momentum_warmup_start = env("MUON_MOMENTUM_WARMUP_START", 0.92, DECAY)
        self.muon_momentum_warmup_steps = env("MUON_MOMENTUM_WARMUP_STEPS", 1500, at_least(0))
        self.muon_backend_steps = env("MUON_BACKEND_STEPS", 5, at_least(1))
        self.muon_row_norm = env("MUON_ROW_NORM", 1, one_of(0, 1))  # 1: MuonEq-R, rows of the update normalized before Newton-Schulz
        self.beta1 = env("BETA1", 0.9, DECAY)
        self.beta2 = env("BETA2", 0.95, DECAY)
        self.adam_eps = env("ADAM_EPS", 1e-8, above(0))
        self.weight_decay = env("WEIGHT_DECAY", 0.095, at_least(0))
        self.grad_clip_norm = env("GRAD_CLIP_NORM", 0.3, at_least(0))  # 0: no clipping

        # Weight averaging.
        self.ema_decay = env("EMA_DECAY", 0.9965, DECAY)  # 0: off
        self.swa_start_frac = env("SWA_START_FRAC", 0.4, between(0, 1))
        self.swa_every = env("SWA_EVERY", 0, at_least(0))  # 0: off

        # Evaluation and logging.
        self.val_loss_every = env("VAL_LOSS_EVERY", 1000, at_least(0))
        self.val_tokens_limit = env("VAL_TOKENS_LIMIT", 0, off_or(at_least(2)))
        self.train_log_every = env("TRAIN_LOG_EVERY", 100, at_least(0))
        self.eval_seq_len = env("EVAL_SEQ_LEN", 0, at_least(0))  # 0: TRAIN_SEQ_LEN
        self.eval_stride = env("EVAL_STRIDE", 64, at_least(0))  # 0: plain non-overlapping windows
        self.eval_batch_seqs = env("EVAL_BATCH_SEQS", 32, at_least(1))

        # Score-first test-time training on the validation text (TTT_EPOCHS=0 and TTT_LORA_RANK=0: off).
        self.ttt_epochs = env("TTT_EPOCHS", 3, at_least(0))  # SGD passes of the whole model per scored chunk; 0: none
        self.ttt_chunk_tokens = env("TTT_CHUNK_TOKENS", 32768, at_least(1))
        self.ttt_phases = env("TTT_PHASES", 3, at_least(0))  # > 0: the chunks are the split cut in this many parts
        self.ttt_lr = env("TTT_LR", 0.02, at_least(0))  # cosine decay across chunks
        self.ttt_momentum = env("TTT_MOMENTUM", 0.9, DECAY)
        self.ttt_grad_clip = env("TTT_GRAD_CLIP", 1.0, at_least(0))  # 0: no clipping
        self.ttt_batch_seqs = env("TTT_BATCH_SEQS", 32, at_least(1))  # over all ranks
        self.ttt_freeze_blocks = env("TTT_FREEZE_BLOCKS", 0, at_least(0))
        # > 0: each document scored alone, with its own low-rank adapters of this rank taking one Adam step on each
        # chunk of TTT_LORA_CHUNK targets once it is scored; the chunked SGD above runs too if TTT_EPOCHS > 0.
        self.ttt_lora_rank = env("TTT_LORA_RANK", 16, at_least(0))
        self.ttt_lora_lr = env("TTT_LORA_LR", 0.0005, at_least(0))  # for rank 16; the best LR went about as 1/rank
        self.ttt_lora_chunk = env("TTT_LORA_CHUNK", 64, at_least(1))  # 32: -0.0007 more, twice the steps

        # Compression and the submission.
        self.quant_bits = env("QUANT_BITS", "mlp:6,attn:6,embed:7,bigram:6,other:8",
                              Range("GROUP:BITS for each of mlp, attn, embed, bigram, other", parse_quant_bits))
        self.quant_clip = env("QUANT_CLIP", "mlp:13,attn:12.5,embed:16,bigram:search,other:search",
                              Range("GROUP:CLIP for each group, CLIP 'search' or standard deviations > 0", parse_quant_clip))
        # Per-matrix clips: k x (sensitivity / group's geometric mean)^-QUANT_ALLOC; 0: the group's k everywhere
        self.quant_alloc = env("QUANT_ALLOC", 0.5, between(0, 1))
        self.gptq_calib_seqs = env("GPTQ_CALIB_SEQS", 64, at_least(0))  # 0: round-to-nearest, no calibration
        self.gptq_reserve_seconds = env("GPTQ_RESERVE_SECONDS", 5.0, at_least(0))
        self.gptq_damp = env("GPTQ_DAMP", 0.01, above(0))
        self.gptq_block = env("GPTQ_BLOCK", 128, at_least(1))
        self.gptq_act_order = env("GPTQ_ACT_ORDER", 1, one_of(0, 1))
        self.fp16_keep = env("FP16_KEEP", "", TEXT)
        self.fp16_max_numel = env("FP16_MAX_NUMEL", 65536, at_least(0))
        self.compressor = env("COMPRESSOR", "auto", one_of("auto", "zstd", "lzma"))
        self.allow_over_cap = env("ALLOW_OVER_CAP", 0, one_of(0, 1))
        self.compile = env("COMPILE", 1, one_of(0, 1))
        self.name = env("NAME", "", TEXT)
        self.author = env("AUTHOR", "", TEXT)
        self.github_id = env("GITHUB_ID", "", TEXT)
        self.blurb = env("BLURB", "", TEXT)
        self.check_combinations()

    def check_combinations(self) -> None:
        """The ranges that depend on other settings."""
        if self.model_dim % self.num_heads or self.model_dim // self.num_heads % 2:
            raise SetupError(f"MODEL_DIM={self.model_dim} must split into NUM_HEADS={self.num_heads} heads of even "
                             "width (rotary embeddings turn pairs of channels)")
        if self.num_heads % self.num_kv_heads:
            raise SetupError(f"NUM_HEADS={self.num_heads} must be a multiple of NUM_KV_HEADS={self.num_kv_heads} "
                             "(each key-value head serves an equal group of query heads)")
        if int(self.mlp_mult * self.model_dim) < 1:
            raise SetupError(f"MLP_MULT={self.mlp_mult} leaves the MLP no hidden unit at MODEL_DIM={self.model_dim}: "
                             f"use at least {1 / self.model_dim:.3g}")
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's, known before any process group
        if not self.grad_accum_steps and (world < 1 or 8 % world):
            raise SetupError(f"WORLD_SIZE={world}: use 1, 2, 4 or 8 processes so 8 micro-batches split evenly "
                             "(gradient accumulation 8/WORLD_SIZE), or set GRAD_ACCUM_STEPS")
        micro = world * (self.grad_accum_steps or 8 // world)
        if self.train_batch_tokens % (micro * self.train_seq_len):
            raise SetupError(f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must split into WORLD_SIZE x GRAD_ACCUM_STEPS = "
                             f"{world} x {micro // world} micro-batches of whole TRAIN_SEQ_LEN={self.train_seq_len} "
                             f"sequences: use a multiple of {micro * self.train_seq_len}")
        if self.loop_repeats and not self.loop_first <= self.loop_last < self.num_layers:
            raise SetupError(f"LOOP_FIRST={self.loop_first} and LOOP_LAST={self.loop_last} must name blocks "
                             f"0 <= LOOP_FIRST <= LOOP_LAST < NUM_LAYERS={self.num_layers} to loop")
        if self.ttt_freeze_blocks > self.num_layers:
            raise SetupError(f"TTT_FREEZE_BLOCKS={self.ttt_freeze_blocks} is more than NUM_LAYERS={self.num_layers}: "
                             f"use 0..{self.num_layers}")
        if self.rope_dims % 2 or self.rope_dims > self.model_dim // self.num_heads:
            raise SetupError(f"ROPE_DIMS={self.rope_dims} must be even and at most the head width "
                             f"{self.model_dim // self.num_heads} (0: all of it)")
        if self.gptq_calib_seqs and 0 < self.max_wallclock_seconds <= self.gptq_reserve_seconds:
            raise SetupError(f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds:g} must be below "
                             f"MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds:g}: it is taken out of the training time")
        if self.quant_alloc and not self.gptq_calib_seqs:
            raise SetupError(f"QUANT_ALLOC={self.quant_alloc:g} spreads clips by sensitivities measured in GPTQ's "
                             "calibration: set GPTQ_CALIB_SEQS above 0, or QUANT_ALLOC=0")
        # The model never saw positions past TRAIN_SEQ_LEN, and the evaluation's time grows with the window.
        if self.eval_seq_len > 4 * self.train_seq_len:
            raise SetupError(f"EVAL_SEQ_LEN={self.eval_seq_len} is over 4 x TRAIN_SEQ_LEN={self.train_seq_len}: use 0 "
                             f"(= TRAIN_SEQ_LEN) or at most {4 * self.train_seq_len}")
        window = self.eval_seq_len or self.train_seq_len
        if self.eval_stride > window:
            raise SetupError(f"EVAL_STRIDE={self.eval_stride} is longer than the evaluation window ({window}), so windows "
                             f"would skip tokens: use 1..{window}, or 0 for plain windows")
        if self.ttt_lora_rank and self.ttt_lora_chunk > window:
            raise SetupError(f"TTT_LORA_CHUNK={self.ttt_lora_chunk} is longer than the evaluation window ({window}), so a "
                             f"chunk's first targets would have no window: use 1..{window}")
        for lr_name, lr in (("MATRIX_LR", self.matrix_lr), ("TIED_EMBED_LR", self.tied_embed_lr)):
            if lr * self.weight_decay >= 1:  # each step multiplies the weights by 1 - lr * WEIGHT_DECAY
                raise SetupError(f"WEIGHT_DECAY={self.weight_decay} with {lr_name}={lr} would zero or flip the weights "
                                 f"every step: keep WEIGHT_DECAY x {lr_name} below 1")


def check_against_val_split(args: Hyperparameters, n_tokens: int) -> None:
    """The windows must fit the validation split (cut by VAL_TOKENS_LIMIT), which only the data can tell:
    evaluation would cut a longer window short without a word."""
    for name, length in (("TRAIN_SEQ_LEN", args.train_seq_len), ("EVAL_SEQ_LEN", args.eval_seq_len)):
        if length > n_tokens - 1:
            cut = f" (VAL_TOKENS_LIMIT={args.val_tokens_limit})" if args.val_tokens_limit else ""
            raise SetupError(f"{name}={length} is longer than the validation split allows: its {n_tokens:,} tokens{cut} "
                             f"hold windows of at most {n_tokens - 1:,}")


# Variables that torchrun, CUDA and friends set; never mistaken for a misspelt setting.
_FOREIGN_PREFIXES = ("TORCH", "NCCL", "CUDA", "PYTORCH", "OMP", "MASTER_", "LOCAL_", "GROUP_", "ROLE_", "TRITON")


def unknown_settings(environ=os.environ) -> list[str]:
    """Warnings for environment variables that look like a misspelt setting (NUM_LAYER for NUM_LAYERS)."""
    warnings = []
    for key in sorted(environ):
        if key in _SETTINGS or not key.isupper() or key.startswith(_FOREIGN_PREFIXES):
            continue
        close = difflib.get_close_matches(key, list(_SETTINGS), n=1, cutoff=0.8)
        if close:
            warnings.append(f"unknown setting {key}={environ[key]!r} is ignored: did you mean {close[0]}?")
    return warnings


# -----------------------------------------------------------------------------
# Optimizer: Muon for the block matrices, Adam for embeddings and scalars


def orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximate the nearest semi-orthogonal matrix to each g[..., :, :] by a quintic Newton-Schulz
    iteration in bf16; the coefficients trade exactness for speed (singular values land in ~[0.7, 1.2])."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


class Muon(torch.optim.Optimizer):
    """Nesterov momentum whose update is orthogonalized. Matrices of one shape are orthogonalized
    together in one batched call; with several ranks each rank takes a share and an all-reduce
    gathers the updates."""

    def __init__(self, params, lr: float, momentum: float, ns_steps: int, weight_decay: float, row_norm: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps, weight_decay=weight_decay,
                                      row_norm=row_norm))

    @torch.no_grad()
    def step(self):
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in group["params"]:
                by_shape.setdefault(p.shape, []).append(p)
            total = sum(p.numel() for p in group["params"])
            flat = torch.zeros(total, dtype=torch.bfloat16, device=group["params"][0].device)
            views, offset = [], 0
            for shape, params in by_shape.items():
                view = flat[offset : offset + len(params) * params[0].numel()].view(len(params), *shape)
                offset += view.numel()
                mine = params[rank::world]  # a slice, not an index list: no host-to-device copy, no sync
                if mine:
                    grads = torch.stack(self._nesterov(mine, group["momentum"]))
                    if group["row_norm"]:  # MuonEq-R: rows of equal norm going in, so no row dominates the result
                        grads = grads / grads.float().norm(dim=-1, keepdim=True).clamp_min(1e-12).to(grads.dtype)
                    view[rank::world] = orthogonalize(grads, group["ns_steps"]) * max(1.0, shape[0] / shape[1]) ** 0.5
                views.append((params, view))
            if world > 1:
                dist.all_reduce(flat)
            params = [p for ps, _ in views for p in ps]
            updates = [u.to(p.dtype) for ps, view in views for p, u in zip(ps, view)]
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, updates, alpha=-group["lr"])

    def _nesterov(self, params: list[torch.Tensor], momentum: float) -> list[torch.Tensor]:
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        grads = [p.grad for p in params]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        return torch._foreach_add(grads, bufs, alpha=momentum)


def build_optimizers(model: nn.Module, args) -> list[torch.optim.Optimizer]:
    """Muon for 2-D matrices outside the embeddings; Adam for the tied embedding and bigram table
    (with weight decay) and for every vector and scalar (without)."""
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    matrices, tables, scalars = [], [], []
    for name, p in model.named_parameters():
        if name in ("tok_emb.weight", "bigram.table.weight"):
            tables.append(p)
        elif name in linear:
            matrices.append(p)
        else:
            scalars.append(p)
    fused = next(model.parameters()).is_cuda
    adam = torch.optim.AdamW(
        [
            dict(params=tables, lr=args.tied_embed_lr, base_lr=args.tied_embed_lr, weight_decay=args.weight_decay),
            dict(params=scalars, lr=args.scalar_lr, base_lr=args.scalar_lr, weight_decay=0.0),
        ],
        betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=fused,
    )
    muon = Muon(matrices, lr=args.matrix_lr, momentum=args.muon_momentum, ns_steps=args.muon_backend_steps,
                weight_decay=args.weight_decay, row_norm=bool(args.muon_row_norm))
    muon.param_groups[0]["base_lr"] = args.matrix_lr
    return [adam, muon]


def training_progress(step: int, elapsed_ms: float, args) -> float:
    """How far the run is, 0 to 1: by steps or by the wallclock cap, whichever is further."""
    progress = step / args.iterations
    if args.max_wallclock_seconds > 0:
        progress = max(progress, elapsed_ms / (1000 * args.max_wallclock_seconds))
    return min(progress, 1.0)


def lr_multiplier(step: int, elapsed_ms: float, args) -> float:
    """Linear warm-up, then 1, then a linear warmdown to LR_FLOOR that ends exactly at ITERATIONS or at
    the wallclock cap, whichever comes first, so a run stopped by the cap always ends annealed. The
    warmdown is the last WARMDOWN_FRAC of the run, or (WARMDOWN_FRAC=0) its last WARMDOWN_ITERS steps, at
    the mean step time so far under the cap."""
    warm = min(1.0, (step + 1) / args.lr_warmup_steps) if args.lr_warmup_steps > 0 else 1.0
    if args.warmdown_frac > 0:
        down = (1 - training_progress(step, elapsed_ms, args)) / args.warmdown_frac
    else:
        down = (args.iterations - step) / max(args.warmdown_iters, 1)
        if args.max_wallclock_seconds > 0:
            remaining_ms = max(1000 * args.max_wallclock_seconds - elapsed_ms, 0.0)
            warmdown_ms = args.warmdown_iters * elapsed_ms / max(step, 1)
            down = min(down, remaining_ms / warmdown_ms if warmdown_ms > 0 else float(remaining_ms > 0))
    down = min(max(down, 0.0), 1.0)
    return warm * (args.lr_floor + (1 - args.lr_floor) * down)


def muon_momentum(step: int, args) -> float:
    """Muon's momentum, raised linearly from MUON_MOMENTUM_WARMUP_START to MUON_MOMENTUM over the first
    MUON_MOMENTUM_WARMUP_STEPS steps."""
    frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum


class WeightAverager:
    """EMA of the weights every step (EMA_DECAY > 0) and/or SWA: an equal-weight mean of snapshots
    taken every SWA_EVERY steps once the LR multiplier is below SWA_START_FRAC. SWA snapshots the EMA
    weights when both are on. The result is what compression receives."""

    def __init__(self, model: nn.Module, ema_decay: float, swa_start_frac: float, swa_every: int):
        self.ema_decay, self.swa_start_frac, self.swa_every = ema_decay, swa_start_frac, swa_every
        current = model.state_dict()
        self.ema = {k: v.detach().float().clone() for k, v in current.items()} if ema_decay > 0 else None
        self.swa = None
        self.swa_count = 0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, lr_mul: float) -> None:
        snapshot = self.swa_every > 0 and lr_mul < self.swa_start_frac and step % self.swa_every == 0
        if self.ema is None and not snapshot:
            return
        current = model.state_dict()
        if self.ema is not None:
            torch._foreach_lerp_(list(self.ema.values()), [current[k].float() for k in self.ema], 1 - self.ema_decay)
        if snapshot:
            source = self.ema if self.ema is not None else {k: v.float() for k, v in current.items()}
            if self.swa is None:
                self.swa = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in source.items()}
            torch._foreach_add_(list(self.swa.values()), [source[k] for k in self.swa])
            self.swa_count += 1

    def averaged(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
        if self.swa_count:
            of = "EMA" if self.ema is not None else "raw"
            return {k: v / self.swa_count for k, v in self.swa.items()}, f"SWA over {self.swa_count} checkpoint{'s' * (self.swa_count > 1)} of the {of} weights"
        if self.ema is not None:
            return {k: v.clone() for k, v in self.ema.items()}, f"EMA (decay {self.ema_decay})"
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}, "none (final weights)"


# -----------------------------------------------------------------------------
# Evaluation: bits per byte, plain, sliding-window and with score-first test-time training


def byte_luts(sp: spm.SentencePieceProcessor, vocab_size: int, device) -> tuple[torch.Tensor, ...]:
    """Per token id: UTF-8 bytes of its piece without the leading space mark, whether it has that mark
    (one space byte, unless it follows a boundary token), and whether it is a boundary token (control,
    unknown, unused: zero bytes). Byte-fallback pieces are one byte."""
    base = np.zeros(vocab_size, dtype=np.int32)
    space = np.zeros(vocab_size, dtype=bool)
    boundary = np.ones(vocab_size, dtype=bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        space[i] = piece.startswith("\u2581")
        base[i] = len(piece.lstrip("\u2581").encode("utf-8")) if space[i] else len(piece.encode("utf-8"))
    return tuple(torch.as_tensor(a, device=device) for a in (base, space, boundary))


def target_bytes(prev: torch.Tensor, target: torch.Tensor, luts) -> torch.Tensor:
    base, space, boundary = luts
    return base[target] + (space[target] & ~boundary[prev]).int()


def window_plan(n_tokens: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Start of each window and the index of its first scored target, so that every target
    tokens[1:] is scored exactly once. The first window scores all its targets, each later one only
    the targets past its predecessor's end; one last window, flush with the end, covers the tail."""
    length = min(seq_len, n_tokens - 1)
    stride = stride or length
    if length < 1 or not 0 < stride <= length:
        raise SetupError(f"EVAL_STRIDE={stride} must lie in 1..{length} (the window length), or 0 for plain windows")
    starts = list(range(0, n_tokens - 1 - length + 1, stride))
    if starts[-1] + length < n_tokens - 1:
        starts.append(n_tokens - 1 - length)
    starts = np.asarray(starts, dtype=np.int64)
    first = np.zeros_like(starts)
    first[1:] = starts[:-1] + length - starts[1:]
    return starts, first


@torch.no_grad()
def window_sums(model, tokens: torch.Tensor, starts: np.ndarray, first: np.ndarray, end: np.ndarray, length: int,
                batch_seqs: int, luts) -> torch.Tensor:
    """Float64 (nats, targets, bytes) over the windows tokens[s : s + length + 1], each scoring its
    targets at offsets first..end-1."""
    device = tokens.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    offsets = torch.arange(length + 1, device=device)
    for i in range(0, len(starts), batch_seqs):
        s = torch.as_tensor(starts[i : i + batch_seqs], device=device)
        f = torch.as_tensor(first[i : i + batch_seqs], device=device)
        e = torch.as_tensor(end[i : i + batch_seqs], device=device)
        pad = batch_seqs - s.numel()  # repeat a window that scores nothing: one compiled shape
        if pad:
            s = torch.cat([s, s[-1:].expand(pad)])
            f = torch.cat([f, torch.full((pad,), length, device=device)])
            e = torch.cat([e, e[-1:].expand(pad)])
        window = tokens[s[:, None] + offsets].long()
        x, y = window[:, :-1], window[:, 1:]
        with autocast(device):
            losses = model(x, y)
        scored = (offsets[None, :-1] >= f[:, None]) & (offsets[None, :-1] < e[:, None])
        sums[0] += losses.double()[scored].sum()
        sums[1] += scored.sum()
        sums[2] += target_bytes(x, y, luts)[scored].sum()
    return sums


def rank_share(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous share of n items."""
    return slice(n * rank // world, n * (rank + 1) // world)


def loss_and_bpb(sums: torch.Tensor) -> tuple[float, float]:
    """(nats per target, bits per byte) from every rank's float64 (nats, targets, bytes)."""
    if dist.is_initialized():
        dist.all_reduce(sums)
    nats, count, nbytes = sums.tolist()
    return nats / count, nats / math.log(2) / nbytes


def evaluate(model, tokens: torch.Tensor, seq_len: int, stride: int, batch_seqs: int, luts,
             rank: int = 0, world: int = 1) -> tuple[float, float]:
    """(val_loss in nats per token, val_bpb) over every target of `tokens`; windows are split over
    ranks and the sums reduced in float64."""
    starts, first = window_plan(tokens.numel(), seq_len, stride)
    length = min(seq_len, tokens.numel() - 1)
    share = rank_share(len(starts), rank, world)
    end = np.full_like(starts, length)
    return loss_and_bpb(window_sums(model, tokens, starts[share], first[share], end[share], length, batch_seqs, luts))


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def sync_time(device: torch.device) -> float:
    """Seconds on the host clock once the GPU has done all it was given."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# Score-first test-time training (TTT). The targets are cut in order into chunks of TTT_CHUNK_TOKENS
# (or into TTT_PHASES equal parts). Each chunk is scored in full by the model as it stands, and only then
# does the model train on it, so no target's score depends on an update that saw it; the last chunk is
# scored and never trained.


def ttt_chunk_tokens(args, n_tokens: int) -> int:
    """Targets per TTT chunk for a text of n_tokens: all of them without the chunked SGD (TTT_EPOCHS=0),
    a TTT_PHASES-th of them with phases, else TTT_CHUNK_TOKENS."""
    if not args.ttt_epochs:
        return n_tokens
    return math.ceil((n_tokens - 1) / args.ttt_phases) if args.ttt_phases else args.ttt_chunk_tokens


def chunk_windows(n_tokens: int, seq_len: int, stride: int, chunk_tokens: int) -> list[tuple[np.ndarray, ...]]:
    """window_plan's windows cut at chunk boundaries: for chunk c (targets tokens[1 + c * chunk_tokens :
    1 + (c + 1) * chunk_tokens]) the windows (start, first, end) that score its targets, at offsets
    first..end-1. A window whose targets straddle a boundary appears in both chunks with the same
    context, so every target is still scored exactly once, and in its own chunk."""
    starts, first = window_plan(n_tokens, seq_len, stride)
    length = min(seq_len, n_tokens - 1)
    first_target, last_target = starts + first + 1, starts + length  # both increase from window to window
    chunks = []
    for lo in range(1, n_tokens, chunk_tokens):
        hi = min(lo + chunk_tokens, n_tokens)  # this chunk's targets: tokens[lo:hi]
        i, j = np.searchsorted(last_target, lo), np.searchsorted(first_target, hi)
        s = starts[i:j]
        chunks.append((s, np.maximum(first[i:j], lo - 1 - s), np.minimum(length, hi - 1 - s)))
    return chunks


def ttt_parameters(model: nn.Module, freeze_blocks: int) -> list[nn.Parameter]:
    """The parameters TTT adapts: all but those of the first `freeze_blocks` blocks, which stop taking gradients."""
    for p in model.blocks[:freeze_blocks].parameters():
        p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def train_on_chunk(model, params: list[nn.Parameter], opt: torch.optim.Optimizer, tokens: torch.Tensor, c: int,
                   chunk: int, seq_len: int, args, rank: int, world: int) -> None:
    """TTT_EPOCHS passes of SGD over chunk c, whose targets are tokens[1 + c * chunk : 1 + (c + 1) * chunk],
    in sequences of seq_len (the last flush with the chunk's end) and batches of TTT_BATCH_SEQS split
    over ranks; the gradients are summed over ranks, so every rank takes the whole batch's mean and
    keeps the same model."""
    length = min(seq_len, chunk)
    starts = c * chunk + window_plan(chunk + 1, length, 0)[0]
    offsets = torch.arange(length + 1, device=tokens.device)
    for _ in range(args.ttt_epochs):
        for i in range(0, len(starts), args.ttt_batch_seqs):
            batch = starts[i : i + args.ttt_batch_seqs]
            mine = torch.as_tensor(batch[rank_share(len(batch), rank, world)], device=tokens.device)
            opt.zero_grad(set_to_none=False)
            if mine.numel():
                window = tokens[mine[:, None] + offsets].long()
                with autocast(tokens.device):
                    losses = model(window[:, :-1], window[:, 1:])
                (losses.sum() / (len(batch) * length)).backward()
            if dist.is_initialized():
                flat = torch.cat([p.grad.flatten().float() for p in params])
                dist.all_reduce(flat)
                for p, g in zip(params, flat.split([p.numel() for p in params])):
                    p.grad.copy_(g.view_as(p))
            if args.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.ttt_grad_clip)
            opt.step()


# Per-document LoRA TTT (TTT_LORA_RANK > 0) scores documents instead of windows. Each document is scored on
# its own tokens alone, in chunks of TTT_LORA_CHUNK targets; after a chunk is scored, the document's own
# adapters take one step on it. Adapters start afresh with every document, so a score depends only on the
# tokens before it in its own document and on what the base model learnt from earlier chunks.


def doc_spans(tokens: np.ndarray, bos: int) -> list[tuple[int, int]]:
    """(first, last) index of each document: from its BOS to the next document's BOS, which it predicts as
    its last target (a text that does not open with BOS opens a document at 0). Their targets, first + 1
    .. last, cover tokens[1:] exactly once."""
    starts = np.flatnonzero(tokens == bos)
    if not len(starts) or starts[0]:
        starts = np.concatenate([[0], starts])
    ends = np.append(starts[1:], len(tokens) - 1)
    return [(int(a), int(b)) for a, b in zip(starts, ends) if b > a]


class DocAdapters:
    """Low-rank adapters, one set per document of a batch: for each virtual layer a delta on q, k and v and
    one on the attention's output (both from the attention's input) and one on the MLP's output (from its
    input), and one on the logits (from the head's input). Document d's delta is x @ A[d] @ B[d]: B starts
    at zero, so untrained adapters change nothing, and A at one random draw that every document shares."""

    def __init__(self, model, docs: int, rank: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        dim, device = model.tok_emb.embedding_dim, model.tok_emb.weight.device
        attn = model.blocks[0].attn
        outs = dict(qkv=attn.q.out_features + attn.k.out_features + attn.v.out_features, attn=dim, mlp=dim)
        keys = [(pos, site) for pos in range(len(model.orders[model.looping])) for site in outs]
        sizes = [outs[site] for _, site in keys] + [model.tok_emb.num_embeddings]
        self.pairs = {}
        for key, out in zip(keys + [(None, "head")], sizes):
            a = (torch.randn(dim, rank, generator=gen) / math.sqrt(dim)).to(device)
            self.pairs[key] = (a.expand(docs, -1, -1).clone().requires_grad_(),
                               torch.zeros(docs, rank, out, device=device, requires_grad=True))

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.pairs.values() for t in pair]

    def at(self, pos: int | None):
        """The delta function of virtual layer `pos` (None: the head): (site, x of n documents) -> delta."""
        def delta(site: str, x: torch.Tensor) -> torch.Tensor:
            a, b = self.pairs[pos, site]
            return torch.bmm(torch.bmm(x, a[: x.size(0)]), b[: x.size(0)])
        return delta


LORA_BETA2, LORA_EPS = 0.999, 1e-8  # the adapters' Adam (torch.optim.Adam's defaults), with beta1 0


def pow2_bucket(n: int, cap: int) -> int:
    """The power of two at or above n, at most cap."""
    return min(1 << (n - 1).bit_length(), cap)


def lora_walk(lengths: list[int], chunk: int, seq_len: int, batch_seqs: int):
    """LoRA TTT's steps over documents of these lengths (longest first), as (i, j, k, rows, window): step k of
    the batch of documents i..j-1, on `rows` documents (a power of two: those still running, padded) and a
    window of `window` positions (a power of two, or seq_len). A batch holds the most documents, a power of
    two, whose padded rows x window fit batch_seqs x seq_len token-passes."""
    i = 0
    while i < len(lengths):
        room = batch_seqs * seq_len // pow2_bucket(min(math.ceil(lengths[i] / chunk) * chunk, seq_len), seq_len)
        j = min(len(lengths), i + (1 << (room.bit_length() - 1)))  # room >= batch_seqs >= 1
        for k in range(math.ceil(lengths[i] / chunk)):
            live = sum(n > k * chunk for n in lengths[i:j])  # the documents not yet done: a prefix
            lo = max(0, (k + 1) * chunk - seq_len)  # the same for every document, whatever its length
            yield i, j, k, pow2_bucket(live, pow2_bucket(j - i, 1 << 30)), pow2_bucket((k + 1) * chunk - lo, seq_len)
        i = j


class LoraRows:
    """DocAdapters for `rows` documents and their Adam state (beta1 is 0: second moments only), made once and
    reset in place for each batch, so that a CUDA graph can keep their addresses."""

    def __init__(self, model, rows: int, args):
        self.adapters = DocAdapters(model, rows, args.ttt_lora_rank, args.seed)
        self.params = self.adapters.parameters()
        self.fresh = [p.detach().clone() for p in self.params]  # A's shared draw, B's zeros
        self.v = [torch.zeros_like(p) for p in self.params]

    def reset(self) -> None:
        with torch.no_grad():
            for p, p0, v in zip(self.params, self.fresh, self.v):
                p.copy_(p0)
                v.zero_()

    def take(self, other: "LoraRows", rows: int) -> None:
        """The first `rows` documents' adapters and Adam state from a larger set."""
        with torch.no_grad():
            for p, q, v, w in zip(self.params, other.params, self.v, other.v):
                p[:rows].copy_(q[:rows])
                v[:rows].copy_(w[:rows])


class LoraStep:
    """One LoRA step at one shape (documents, window): score the masked targets of one chunk of each document,
    add their sums, then one Adam step of the adapters on their loss. The head reads only the window positions
    `pos` that predict the chunk. Inputs sit in fixed buffers, so that on the GPU the step is captured once as
    a CUDA graph and replayed: a step is about 1,700 small kernels, whose launches otherwise took the host
    four times the GPU's own time (benchmarks/2026-12-02-proxy-c/r12_profile.txt)."""

    def __init__(self, model, rows: LoraRows, window: int, chunk: int, luts, sums: torch.Tensor,
                 t_sqrt: torch.Tensor, lr: float):
        device, n = sums.device, rows.params[0].size(0)
        self.model, self.rows, self.luts, self.sums, self.t_sqrt, self.lr = model, rows, luts, sums, t_sqrt, lr
        self.ids = torch.zeros(n, window, dtype=torch.long, device=device)
        self.pos = torch.arange(chunk, device=device)
        self.prev, self.targets = (torch.zeros(n, chunk, dtype=torch.long, device=device) for _ in range(2))
        self.mask = torch.zeros(n, chunk, device=device)
        self.graph = None

    def __call__(self) -> None:
        model, adapters = self.model, self.rows.adapters
        with torch.autocast(self.ids.device.type, torch.bfloat16, enabled=self.ids.is_cuda, cache_enabled=False):
            h = model.head_input(rms_norm(model.last_hidden(self.ids, adapters).index_select(1, self.pos)))
            logits = model.head_logits(h, adapters.at(None))
            losses = F.cross_entropy(logits.flatten(0, 1), self.targets.flatten(), reduction="none")
        losses = losses.view_as(self.mask) * self.mask
        nbytes = (target_bytes(self.prev, self.targets, self.luts) * self.mask).sum()
        self.sums += torch.stack([losses.detach().double().sum(), self.mask.double().sum(), nbytes.double()])
        grads = torch.autograd.grad(losses.sum(), self.rows.params)  # scored above, trained on now
        with torch.no_grad():  # Adam as torch.optim.Adam does it with beta1 0, written out to run in the graph
            for p, g, v in zip(self.rows.params, grads, self.rows.v):
                v.mul_(LORA_BETA2).addcmul_(g, g, value=1 - LORA_BETA2)
                p.addcdiv_(g, (v.sqrt() / self.t_sqrt).add_(LORA_EPS), value=-self.lr)

    def capture(self, pool) -> None:
        """Warm up on a side stream with an empty mask (which changes nothing but Adam's v, saved and put
        back), then capture into the pool that all steps share: nothing a step allocates outlives it."""
        saved = [v.clone() for v in self.rows.v]
        self.mask.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self()
        with torch.no_grad():
            for v, s in zip(self.rows.v, saved):
                v.copy_(s)

    def run(self) -> None:
        self.graph.replay() if self.graph is not None else self()


class LoraScorer:
    """Per-document LoRA TTT: float64 (nats, targets, bytes) of the documents `spans`, longest first, each
    document scored with its own adapters, which train on each chunk of it once it is scored. A batch walks
    its documents together: step k scores targets kC+1..(k+1)C of each (C = TTT_LORA_CHUNK) on inputs from
    (k+1)C - seq_len on (at most seq_len), then trains. Shapes come in powers of two, so that there are few
    (on the proxy about 35, each a CUDA graph on the GPU): the documents still running padded in rows, the
    window padded on the right, which causal attention keeps from the real positions; a mask keeps padding out
    of the sums and the gradients (batches and shapes: lora_walk). Steps and graphs persist from call to call
    (docs+lora+ttt calls once per TTT chunk): the base model's SGD updates its weights in place, and the graphs
    read them."""

    def __init__(self, model, args, luts, device: torch.device):
        self.model, self.args, self.luts = model, args, luts
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.t_sqrt = torch.ones((), device=device)  # Adam's bias correction sqrt(1 - beta2^t) of the step
        self.rows, self.steps = {}, {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def step(self, rows: int, window: int) -> LoraStep:
        if rows not in self.rows:
            self.rows[rows] = LoraRows(self.model, rows, self.args)
        if (rows, window) not in self.steps:
            step = self.steps[rows, window] = LoraStep(self.model, self.rows[rows], window, self.args.ttt_lora_chunk,
                                                       self.luts, self.sums, self.t_sqrt, self.args.ttt_lora_lr)
            if self.pool is not None:
                step.capture(self.pool)
        return self.steps[rows, window]

    def __call__(self, tokens: torch.Tensor, spans: list[tuple[int, int]], seq_len: int) -> torch.Tensor:
        chunk, device = self.args.ttt_lora_chunk, tokens.device
        self.sums.zero_()
        lengths = [b - a for a, b in spans]  # targets per document, longest first
        for i, j, k, rows, window in lora_walk(lengths, chunk, seq_len, self.args.eval_batch_seqs):
            step = self.step(rows, window)
            if k == 0:  # a new batch: documents i..j-1, and padded rows that score nothing
                top = pow2_bucket(j - i, 1 << 30)
                n_targets = torch.tensor(lengths[i:j] + [0] * (top - (j - i)), device=device)
                docs = torch.zeros(top, lengths[i] + 1 + seq_len, dtype=torch.long, device=device)
                for d, (a, b) in enumerate(spans[i:j]):
                    docs[d, : b - a + 1] = tokens[a : b + 1]
                self.rows[rows].reset()
            elif rows != rows_now:
                self.rows[rows].take(self.rows[rows_now], rows)
            rows_now = rows
            first, lo = k * chunk, max(0, (k + 1) * chunk - seq_len)
            target = torch.arange(first + 1, first + chunk + 1, device=device)
            step.ids.copy_(docs[:rows, lo : lo + window])
            step.pos.copy_(target - lo - 1)  # the window position that predicts each target
            step.prev.copy_(docs[:rows, first : first + chunk])
            step.targets.copy_(docs[:rows, first + 1 : first + chunk + 1])
            step.mask.copy_(target <= n_targets[:rows, None])
            self.t_sqrt.fill_(math.sqrt(1 - LORA_BETA2 ** (k + 1)))
            step.run()
        return self.sums.clone()


def doc_groups(tokens: np.ndarray, bos: int, chunk: int, n_chunks: int) -> list[list[tuple[int, int]]]:
    """The documents (doc_spans) that open in each TTT chunk of `chunk` targets, longest first; a rank takes
    every world-th from its rank. Every target lies in its document's opening chunk or a later one, so it is
    scored before the base model trains on it."""
    groups = [[] for _ in range(n_chunks)]
    for span in sorted(doc_spans(tokens, bos), key=lambda s: s[0] - s[1]):
        groups[span[0] // chunk].append(span)
    return groups


def evaluate_ttt(model, params: list[nn.Parameter], tokens: torch.Tensor, seq_len: int, stride: int, luts, args,
                 rank: int = 0, world: int = 1, eager=None) -> tuple[float, float, float, float]:
    """(val_loss, val_bpb, scoring seconds, adaptation seconds) with score-first TTT of `params`, which
    belong to `model` and change in place. Each chunk's windows are split over ranks as in evaluate(); with
    TTT_LORA_RANK, the documents that open in the chunk are scored instead, by per-document LoRA on `eager`
    (`model` uncompiled), sorted by length and dealt out to ranks; the adapters' steps count as scoring.
    With TTT_EPOCHS=0 there is one chunk."""
    chunk = ttt_chunk_tokens(args, tokens.numel())
    chunks = chunk_windows(tokens.numel(), seq_len, stride, chunk)
    length = min(seq_len, tokens.numel() - 1)
    if args.ttt_lora_rank:
        groups = doc_groups(tokens.cpu().numpy(), eager.bos_id, chunk, len(chunks))
        lora = LoraScorer(eager, args, luts, tokens.device)
    opt = torch.optim.SGD(params, lr=args.ttt_lr, momentum=args.ttt_momentum)
    for p in params:
        p.grad = torch.zeros_like(p)  # kept: a rank without a sequence in some step still all-reduces zeros
    sums = torch.zeros(3, dtype=torch.float64, device=tokens.device)
    score_s = adapt_s = 0.0
    for c, (starts, first, end) in enumerate(chunks):
        t0 = sync_time(tokens.device)
        if args.ttt_lora_rank:
            sums += lora(tokens, groups[c][rank::world], seq_len)
        else:
            share = rank_share(len(starts), rank, world)
            sums += window_sums(model, tokens, starts[share], first[share], end[share], length, args.eval_batch_seqs, luts)
        t1 = sync_time(tokens.device)
        score_s += t1 - t0
        if c + 1 < len(chunks):
            opt.param_groups[0]["lr"] = args.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / (len(chunks) - 1)))
            train_on_chunk(model, params, opt, tokens, c, chunk, seq_len, args, rank, world)
            adapt_s += sync_time(tokens.device) - t1
    return *loss_and_bpb(sums), score_s, adapt_s


# -----------------------------------------------------------------------------
# Quantization and packing: mixed-width per-row integers (GPTQ where calibration gave a Hessian),
# compressed with zstd or lzma

QUANT_GROUPS = ("mlp", "attn", "embed", "bigram", "other")
CALIB_BATCH_SEQS = 8  # calibration sequences per forward
CLIP_FRACTIONS = (1.0, 0.98, 0.95, 0.92, 0.88, 0.84, 0.8, 0.75, 0.7)
PACK_MAGIC = b"PGQ2"


def parse_groups(setting: str, spec: str, value_of, expected: str) -> dict:
    """{group: value} from "mlp:5,attn:6,..."; every group must be named."""
    values = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        group, _, text = item.partition(":")
        try:
            if group not in QUANT_GROUPS:
                raise ValueError(group)
            values[group] = value_of(text)
        except ValueError:
            raise SetupError(f"{setting} item {item!r}: expected GROUP:{expected} with GROUP in {','.join(QUANT_GROUPS)}") from None
    missing = [g for g in QUANT_GROUPS if g not in values]
    if missing:
        raise SetupError(f"{setting}={spec!r} names no value for {', '.join(missing)}")
    return values


def bits_value(text: str) -> int:
    if not text.isdecimal() or not 2 <= int(text) <= 8:
        raise ValueError(text)
    return int(text)


def clip_value(text: str) -> float | None:
    if text == "search":
        return None
    k = float(text)
    if not 0 < k < math.inf:
        raise ValueError(text)
    return k


def parse_quant_bits(spec: str) -> dict[str, int]:
    return parse_groups("QUANT_BITS", spec, bits_value, "BITS with BITS in 2..8")


def parse_quant_clip(spec: str) -> dict[str, float | None]:
    return parse_groups("QUANT_CLIP", spec, clip_value, "CLIP with CLIP 'search' or a number of standard deviations > 0")


def tensor_group(name: str, t: torch.Tensor, fp16_keep: list[str], fp16_max_numel: int) -> str:
    """fp16 for vectors, small tensors and FP16_KEEP names; else the quantization group of the name."""
    if t.ndim != 2 or t.numel() <= fp16_max_numel or any(frag in name for frag in fp16_keep):
        return "fp16"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name:
        return "attn"
    if name.startswith("tok_emb."):
        return "embed"
    if name.startswith("bigram."):
        return "bigram"
    return "other"


def rounded(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    return (w / scale).round().clamp(-qmax, qmax)


def row_scales(w: torch.Tensor, bits: int, clip: float | None) -> torch.Tensor:
    """Each row's step (rows x 1, fp16 values). clip None: the fraction of the row's max with the least
    squared rounding error (clipping a few outliers buys finer steps for the rest). clip k (SDClip): k
    standard deviations; a wider clip lowers the integers' entropy and so the compressed bytes."""
    qmax = 2 ** (bits - 1) - 1
    if clip is not None:
        return (clip * w.std(dim=1, correction=0, keepdim=True) / qmax).clamp_min(2**-24).half().float()
    absmax = w.abs().amax(dim=1, keepdim=True)
    best_err = best_scale = None
    for frac in CLIP_FRACTIONS:
        scale = (absmax * frac / qmax).clamp_min(2**-24).half().float()
        err = (rounded(w, scale, qmax) * scale - w).square().sum(dim=1, keepdim=True)
        if best_err is None:
            best_err, best_scale = err, scale
        else:  # on a tie the earlier (wider) fraction stays
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    return best_scale


def quantize_rows(w: torch.Tensor, bits: int, clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row integers in [-qmax, qmax], qmax = 2^(bits-1) - 1, rounded to nearest; fp16 scales."""
    w = w.float()
    scale = row_scales(w, bits, clip)
    return rounded(w, scale, 2 ** (bits - 1) - 1).to(torch.int8), scale.squeeze(1).half()


@torch.no_grad()
def gptq_rows(w: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor, bits: int, block: int = 128,
              damp: float = 0.01, act_order: bool = True) -> torch.Tensor:
    """Integers at the given row scales that keep the output X W^T close, not W (GPTQ, Frantar et al. 2023;
    H = sum of x x^T over calibration inputs). Columns are rounded one by one (most active inputs first
    with act_order) and each one's error is pushed onto the columns not yet rounded through the upper
    Cholesky factor of H^-1. Runs on H's device."""
    w = w.to(hessian.device, torch.float32)
    scale = scale.to(w.device, torch.float32)[:, None]
    qmax = 2 ** (bits - 1) - 1
    h = hessian.double().clone()
    diag = h.diagonal()
    order = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(h.size(0), device=h.device)
    # A dead input (zero row and column) gets a unit diagonal: rounded plainly, no error in or out.
    diag[diag == 0] = 1
    diag.add_(damp * diag.mean())  # damping keeps H invertible and the corrections moderate
    h = h[order][:, order]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    w = w[:, order]
    q = torch.empty_like(w)
    for start in range(0, w.size(1), block):
        end = min(start + block, w.size(1))
        wb, ub = w[:, start:end], u[start:end, start:end]
        err = torch.empty_like(wb)
        for i in range(end - start):
            qi = rounded(wb[:, i : i + 1], scale, qmax)
            e = (wb[:, i : i + 1] - qi * scale) / ub[i, i]
            wb[:, i + 1 :] -= e * ub[i : i + 1, i + 1 :]
            q[:, start + i], err[:, i] = qi[:, 0], e[:, 0]
        w[:, end:] -= err @ u[start:end, end:]  # the block's errors reach the later columns in one matmul
    out = torch.empty_like(q)
    out[:, order] = q
    return out.to(torch.int8).cpu()


def hessian_inputs(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Modules whose input is the input of weight matrices, with those matrices' names: each nn.Linear
    (q, k, v are never called, so never fire), each Attention (q, k, v are one F.linear of its input)
    and the tied head's input."""
    targets = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            targets[module] = [f"{name}.weight"]
        elif isinstance(module, Attention):
            targets[module] = [f"{name}.{part}.weight" for part in ("q", "k", "v")]
    targets[model.head_input] = ["tok_emb.weight"]
    return targets


@torch.no_grad()
def collect_hessians(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     batch_seqs: int = CALIB_BATCH_SEQS) -> dict[str, torch.Tensor]:
    """H = sum of a a^T over each weight matrix's inputs a, by name, summed over ranks. The model must be
    uncompiled, fp32, without autocast: then the Triton kernels are off and the MLP calls its nn.Linear
    modules, so pre-hooks see every input. A module called several times (shared layers) adds up."""
    targets, sums = hessian_inputs(model), {}

    def accumulate(module, inputs):
        a = inputs[0].detach().flatten(0, -2).float()
        if module in sums:
            sums[module].addmm_(a.T, a)
        else:
            sums[module] = a.T @ a

    hooks = [module.register_forward_pre_hook(accumulate) for module in targets]
    for xb, yb in zip(x.split(batch_seqs), y.split(batch_seqs)):
        model(xb, yb)
    for hook in hooks:
        hook.remove()
    if dist.is_initialized():
        for h in sums.values():  # every rank fires the same modules in the same order
            dist.all_reduce(h)
    return {name: sums[module] for module, names in targets.items() if module in sums for name in names}


def weight_sensitivities(model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
    """Each matrix's mean over weights of g^2 var(row), g the loss gradient for next tokens the model draws
    from its own predictions (not the text's), summed over ranks. With drawn targets a token's expected
    gradient is zero, so g^2 estimates the Fisher (= Gauss-Newton) diagonal over the tokens, free of the
    mean gradient and of correlations between tokens: the loss a unit of squared rounding error costs.
    SDClip's step is k std(row) / qmax, so times var(row) it is the loss per unit of k^2, which is what the
    clips trade against bytes."""
    heads = []
    hook = model.head_input.register_forward_hook(lambda module, inputs, out: heads.append(out))
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        model(x, torch.zeros_like(x))  # for the head's input only: the loss is taken on drawn targets below
        logits = model.head_logits(heads[0]).flatten(0, 1)
        drawn = torch.multinomial(logits.detach().softmax(-1), 1, generator=generator).squeeze(1)
        F.cross_entropy(logits, drawn).backward()
    hook.remove()
    matrices = [(name, p) for name, p in model.named_parameters() if p.ndim == 2 and p.numel() and p.grad is not None]
    squares = torch.stack([(p.grad.float().square() * p.float().var(dim=1, correction=0, keepdim=True)).mean()
                           for _, p in matrices])
    model.zero_grad(set_to_none=True)
    if dist.is_initialized():
        dist.all_reduce(squares)
    return dict(zip((name for name, _ in matrices), squares.tolist()))


def allocated_clips(state: dict[str, torch.Tensor], groups: dict[str, str], clips: dict[str, float | None],
                    sensitivities: dict[str, float], alloc: float) -> dict[str, float | None]:
    """Each matrix's clip: its group's SDClip k times (s / S)^-alloc, s its sensitivity (weight_sensitivities)
    and S the group's geometric mean of s weighted by size, kept within 2x of k (a narrower clip would cut
    int6 tails). A matrix's loss grows as s k^2 while its bytes fall as log k, so alloc 0.5 puts a group's
    bytes where they buy the most (4x the sensitivity, half the step: one bit more) and leaves the group's
    bytes as they were."""
    out = {name: clips.get(group) for name, group in groups.items()}
    for group, k in clips.items():
        names = [n for n, g in groups.items() if g == group and n in sensitivities]
        if k is None or not alloc or not names:
            continue
        logs = {n: math.log(max(sensitivities[n], 1e-30)) for n in names}
        sizes = {n: state[n].numel() for n in names}
        center = sum(logs[n] * sizes[n] for n in names) / sum(sizes.values())
        for n in names:
            out[n] = k * min(max(math.exp(-alloc * (logs[n] - center)), 0.5), 2.0)
    return out


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def codec_names(method: str) -> list[str]:
    """The codecs that COMPRESSOR asks for and this machine has."""
    names = [name for name in ("zstd", "lzma") if method in ("auto", name) and (name != "zstd" or zstandard)]
    if not names:
        raise SetupError(f"COMPRESSOR={method!r}: use auto, zstd or lzma (zstd needs `pip install zstandard`)")
    return names


def compress(raw: bytes, method: str) -> tuple[str, bytes]:
    """(codec, bytes): zstd level 22, lzma preset 9 extreme, or whichever is smaller ("auto"). Both
    release the GIL, so "auto" runs them side by side."""
    codecs = {"zstd": lambda: zstandard.ZstdCompressor(level=22).compress(raw),
              "lzma": lambda: lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)}
    names = codec_names(method)
    with ThreadPoolExecutor(len(names)) as pool:
        futures = {name: pool.submit(codecs[name]) for name in names}
    return min(((name, f.result()) for name, f in futures.items()), key=lambda c: len(c[1]))


def decompress(data: bytes, codec: str) -> bytes:
    if codec == "zstd":
        if zstandard is None:
            raise SetupError("this artifact is zstd-packed: `pip install zstandard` to read it")
        return zstandard.ZstdDecompressor().decompress(data)
    return lzma.decompress(data)


def output_error(w: torch.Tensor, deq: torch.Tensor, hessian: torch.Tensor) -> tuple[float, float]:
    """(tr(E H E^T), tr(W H W^T)): the squared output error and output over the calibration inputs."""
    w = w.to(hessian.device, torch.float32)
    e = deq.to(w.device) - w
    return float(((e @ hessian) * e).sum()), float(((w @ hessian) * w).sum())


def byte_planes(halves: bytes) -> bytes:
    """fp16 values as a plane of low bytes, then one of high bytes: row scales share sign and exponent, so
    the high plane compresses to little (10.6 KB less than interleaved at the default config)."""
    return np.frombuffer(halves, dtype=np.uint8).reshape(-1, 2).T.tobytes()


def pack_model(state: dict[str, torch.Tensor], bits: dict[str, int], fp16_keep: list[str], fp16_max_numel: int,
               method: str, clips: dict[str, float | None] | None = None, hessians: dict[str, torch.Tensor] | None = None,
               sensitivities: dict[str, float] | None = None, alloc: float = 0.0, **gptq) -> tuple[bytes, list[dict]]:
    """The compressed artifact and one report row per section. Tensors are grouped (mlp, attn, embed,
    bigram, other; fp16 for small or FP16_KEEP tensors) and each group is compressed on its own, so the
    report's bytes add up to the file. Tensors with a Hessian go through GPTQ (gptq: gptq_rows' block, damp,
    act_order), the rest are rounded to nearest; clips: each group's clip (default: the search), spread over
    its matrices by their sensitivities with alloc > 0 (allocated_clips). The report gives GPTQ's and
    rounding's relative output error tr(E H E^T) / tr(W H W^T)."""
    clips, hessians = clips or dict.fromkeys(QUANT_GROUPS), hessians or {}
    groups = {name: tensor_group(name, t, fp16_keep, fp16_max_numel) for name, t in state.items()}
    tensor_clips = allocated_clips(state, groups, clips, sensitivities or {}, alloc)
    entries, sections, errors = [], {}, {}
    for name, t in state.items():
        t, group = t.detach(), groups[name]
        entries.append(dict(name=name, shape=list(t.shape), group=group))
        parts = sections.setdefault(group, ([], []))
        if group == "fp16":
            parts[0].append(t.cpu().half().numpy().tobytes())
            continue
        q, scale = quantize_rows(t.cpu(), bits[group], tensor_clips[name])
        if name in hessians:
            h, rtn = hessians[name], dequantize_rows(q, scale)
            q = gptq_rows(t, scale, h, bits[group], **gptq)
            gptq_err, signal = output_error(t, dequantize_rows(q, scale), h)
            errors.setdefault(group, []).append((gptq_err, output_error(t, rtn, h)[0], signal))
        parts[0].append(q.numpy().tobytes())
        parts[1].append(scale.numpy().tobytes())
    raws = [b"".join(values) + byte_planes(b"".join(scales)) for values, scales in sections.values()]
    with ThreadPoolExecutor(max(len(raws), 1)) as pool:  # a thread per section: the largest sets the time
        packed = list(pool.map(lambda raw: compress(raw, method), raws))
    blobs, report = [], []
    for group, raw, (codec, blob) in zip(sections, raws, packed):
        blobs.append(blob)
        members = [e for e in entries if e["group"] == group]
        row = dict(group=group, codec=codec, bytes=len(blob), raw=len(raw), tensors=len(members),
                   params=sum(math.prod(e["shape"]) for e in members), bits=16 if group == "fp16" else bits[group])
        if group != "fp16":
            gptq_err, rtn_err, signal = (sum(v) for v in zip(*errors.get(group, [(0.0, 0.0, 1.0)])))
            ks = sorted({tensor_clips[e["name"]] for e in members} - {None})
            clip = "search" if not ks else ks[0] if len(ks) == 1 else f"{ks[0]:.3g}-{ks[-1]:.3g}"
            row.update(clip=clip, gptq=len(errors.get(group, [])),
                       gptq_err=float(f"{gptq_err / signal:.4g}"), rtn_err=float(f"{rtn_err / signal:.4g}"))
        report.append(row)
    header = json.dumps(dict(tensors=entries, sections=report)).encode()
    return PACK_MAGIC + len(header).to_bytes(4, "little") + header + b"".join(blobs), report


def payload_bytes(state: dict[str, torch.Tensor], bits: dict[str, int], fp16_keep: list[str], fp16_max_numel: int,
                  clips: dict[str, float | None] | None = None) -> int:
    """The artifact's expected model bytes, before training: an fp16 scale per row, 16 bits per kept value,
    and per quantized value its bits (search clip: zstd/lzma took 10.6% off those after short H100 runs,
    and is not counted on), or with SDClip k the entropy of a Gaussian row rounded at steps of k std / qmax,
    log2(qmax sqrt(2 pi e) / k) bits, which the packed integers of the proxy's default came within 3% of."""
    clips = clips or {}
    total = 0.0
    for name, t in state.items():
        group = tensor_group(name, t, fp16_keep, fp16_max_numel)
        if group == "fp16":
            total += 2 * t.numel()
            continue
        k, value_bits = clips.get(group), bits[group]
        if k is not None:
            value_bits = min(value_bits, math.log2((2 ** (value_bits - 1) - 1) * math.sqrt(2 * math.pi * math.e) / k))
        total += t.numel() * value_bits / 8 + 2 * t.size(0)
    return int(total)


def unpack_model(data: bytes) -> dict[str, torch.Tensor]:
    """Rebuild float32 tensors from an artifact made by pack_model."""
    if data[:4] != PACK_MAGIC:
        raise SetupError("not a model artifact of this script (bad magic)")
    n = int.from_bytes(data[4:8], "little")
    header = json.loads(data[8 : 8 + n])
    raw, offset = {}, 8 + n
    for sec in header["sections"]:
        raw[sec["group"]] = decompress(data[offset : offset + sec["bytes"]], sec["codec"])
        offset += sec["bytes"]
    members = {g: [e for e in header["tensors"] if e["group"] == g] for g in raw}
    state = {}
    for group, blob in raw.items():
        if group == "fp16":
            pos = 0
            for e in members[group]:
                count = math.prod(e["shape"])
                state[e["name"]] = torch.frombuffer(bytearray(blob[pos : pos + 2 * count]), dtype=torch.float16).float().reshape(e["shape"])
                pos += 2 * count
            continue
        pos = row = 0
        planes = torch.frombuffer(bytearray(blob[sum(math.prod(e["shape"]) for e in members[group]) :]), dtype=torch.uint8)
        scales = planes.view(2, -1).T.contiguous().view(torch.float16).flatten()  # byte_planes undone
        for e in members[group]:
            rows, cols = e["shape"]
            q = torch.frombuffer(bytearray(blob[pos : pos + rows * cols]), dtype=torch.int8).reshape(rows, cols)
            state[e["name"]] = dequantize_rows(q, scales[row : row + rows])
            pos += rows * cols
            row += rows
    return {e["name"]: state[e["name"]] for e in header["tensors"]}


def check_artifact_size(code_bytes: int, model_bytes: int, allow_over_cap: bool) -> int:
    total = code_bytes + model_bytes
    if total > ARTIFACT_CAP_BYTES and not allow_over_cap:
        raise SetupError(
            f"artifact is {total:,} bytes ({code_bytes:,} code + {model_bytes:,} model), "
            f"{total - ARTIFACT_CAP_BYTES:,} over the {ARTIFACT_CAP_BYTES:,}-byte cap: lower QUANT_BITS "
            "(e.g. mlp:4), NUM_LAYERS, MODEL_DIM, MLP_MULT or BIGRAM_VOCAB_SIZE, or set ALLOW_OVER_CAP=1 for an experiment"
        )
    return total


# -----------------------------------------------------------------------------
# Data: the challenge's shards (256 x int32 header, then uint16 tokens)

SHARD_MAGIC, SHARD_VERSION, HEADER_BYTES = 20240520, 1, 1024


def shard_paths(pattern: str) -> list[Path]:
    path = Path(pattern)
    files = sorted(path.parent.glob(path.name))
    if not files:
        raise SetupError(f"no shards match {pattern}: download them with the challenge's "
                         "data/cached_challenge_fineweb.py, or point DATA_PATH at the folder that holds them")
    return files


def read_shard(path: Path, vocab_size: int) -> np.ndarray:
    """The shard's tokens, memory-mapped, after checking its header, its size and its token ids."""
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise SetupError(f"{path}: {size} bytes is shorter than the 1024-byte header; the file is damaged, fetch it again")
    magic, version, count = np.fromfile(path, dtype="<i4", count=3)
    if magic != SHARD_MAGIC or version != SHARD_VERSION:
        raise SetupError(f"{path}: header has magic {magic} version {version}, expected {SHARD_MAGIC} version "
                         f"{SHARD_VERSION}; this is not a challenge shard, regenerate it")
    if size != HEADER_BYTES + 2 * count:
        raise SetupError(f"{path}: header promises {count} tokens ({HEADER_BYTES + 2 * count} bytes) but the file has "
                         f"{size} bytes; the file is truncated or damaged, fetch it again")
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(int(count),))
    top = int(tokens.max()) if count else 0
    if top >= vocab_size:
        raise SetupError(f"{path}: token id {top} is not below VOCAB_SIZE={vocab_size}; the shards were made with "
                         "another tokenizer, set VOCAB_SIZE and TOKENIZER_PATH to the ones that made them")
    return tokens


def load_val_tokens(pattern: str, vocab_size: int, limit: int) -> np.ndarray:
    tokens = np.concatenate([read_shard(p, vocab_size) for p in shard_paths(pattern)])
    if limit:
        tokens = tokens[:limit]
    if tokens.size < 2:
        raise SetupError(f"{pattern}: the validation split has {tokens.size} tokens, too few to score")
    return tokens


class TokenStream:
    """The training shards read in order as one endless stream, wrapping after the last."""

    def __init__(self, pattern: str, vocab_size: int):
        self.files, self.vocab_size = shard_paths(pattern), vocab_size
        if all(f.stat().st_size <= HEADER_BYTES for f in self.files):
            raise SetupError(f"{pattern}: the training shards hold no tokens; regenerate them")
        self.index, self.pos = 0, 0
        self.tokens = read_shard(self.files[0], vocab_size)

    def take(self, n: int) -> np.ndarray:
        out, need = [], n
        while need:
            if self.pos == len(self.tokens):
                self.index = (self.index + 1) % len(self.files)
                self.tokens, self.pos = read_shard(self.files[self.index], self.vocab_size), 0
                continue
            piece = self.tokens[self.pos : self.pos + need]
            out.append(piece)
            self.pos += len(piece)
            need -= len(piece)
        return np.concatenate(out)


class DistributedTokenLoader:
    """Each call takes the next world * (local + 1) tokens of the stream; rank r keeps the r-th slice,
    so ranks never overlap and no token is read twice within an epoch."""

    def __init__(self, pattern: str, vocab_size: int, rank: int, world: int, device: torch.device):
        self.pattern, self.vocab_size = pattern, vocab_size
        self.rank, self.world, self.device = rank, world, device
        self.stream = TokenStream(pattern, vocab_size)

    def reset(self) -> None:
        self.stream = TokenStream(self.pattern, self.vocab_size)

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world)[self.rank * span : (self.rank + 1) * span]
        t = torch.from_numpy(chunk.astype(np.int32))
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        t = t.long()
        return t[:-1].view(-1, seq_len), t[1:].view(-1, seq_len)


# -----------------------------------------------------------------------------
# Model


def stream_dtype(device: torch.device) -> torch.dtype:
    """The residual stream's dtype: bf16 under autocast (as in the challenge's baseline), which halves the
    bytes of every memory-bound norm and residual kernel (bare step 615 -> 561 ms on H100); fp32 on CPU."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """In fp32, as autocast runs it anyway, so eps is always float32's."""
    return F.rms_norm(x.float(), (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, base: float, rope_dims: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of (1, seq_len, 1, head_dim / 2). Dimension j pairs with j + head_dim / 2; partial RoPE
    (rope_dims < head_dim) rotates only the first rope_dims / 2 pairs, at the frequencies of a rope_dims-wide
    head, and leaves the rest (angle 0) free of position."""
    rotated = (rope_dims or head_dim) // 2
    inv_freq = base ** (-torch.arange(rotated, dtype=torch.float32) / rotated)
    angles = F.pad(torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq), (0, head_dim // 2 - rotated))
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, : x.size(1)].to(x.dtype), sin[:, : x.size(1)].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def triton_runs(x: torch.Tensor) -> bool:
    """Whether the Triton kernels below take x: bf16 on a GPU."""
    return triton is not None and x.is_cuda and x.dtype == torch.bfloat16


def qkv_layout(qkv: torch.Tensor, cos: torch.Tensor, heads: int) -> tuple[int, int]:
    """(head_dim, kv_heads) of the fused projection (b, t, (heads + 2 kv_heads) head_dim)."""
    head_dim = 2 * cos.size(-1)
    return head_dim, (qkv.size(-1) // head_dim - heads) // 2


def qk_norm_rotary_reference(qkv: torch.Tensor, gain: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused projection into q, k, v of (b, t, heads, head_dim). Normalized q and k keep
    attention logits bounded, the learned per-head gain sets their temperature, and both are rotated
    by position."""
    b, t, _ = qkv.shape
    head_dim, kv_heads = qkv_layout(qkv, cos, heads)
    q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    q = rms_norm(q.view(b, t, heads, head_dim)) * gain[:, None].to(qkv.dtype)
    k = rms_norm(k.view(b, t, kv_heads, head_dim))
    q, k = apply_rotary(q.to(qkv.dtype), cos, sin), apply_rotary(k.to(qkv.dtype), cos, sin)
    return q, k, v.view(b, t, kv_heads, head_dim)


# The same function as one Triton kernel each way. Compiled, the plain version took five kernels and
# ~600 us per layer and micro-batch (forward and backward) on H100 at the training shape, several
# times its bytes at memory bandwidth. The kernels compute in fp32 and round where the plain version
# rounds to bf16. Each program takes BLOCK tokens (rows of qkv) and walks every q and k head.
if triton is not None:

    @triton.jit
    def _rotary_tables(cos, sin, pos, cols, mask, HALF: tl.constexpr):
        at = pos[:, None] * HALF + cols[None, :]
        c = tl.load(cos + at, mask=mask, other=0.0).to(tl.bfloat16).to(tl.float32)
        s = tl.load(sin + at, mask=mask, other=0.0).to(tl.bfloat16).to(tl.float32)
        return c, s

    @triton.jit
    def _qk_norm_rotary_fwd(qkv, gain, cos, sin, q_out, k_out, v_out, n_rows, seq_len, eps,
                            HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
        D: tl.constexpr = 2 * HALF
        WIDTH: tl.constexpr = (HEADS + 2 * KV_HEADS) * D
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, HALF)
        mask = (rows < n_rows)[:, None]
        c, s = _rotary_tables(cos, sin, rows % seq_len, cols, mask, HALF)
        src = qkv + rows[:, None] * WIDTH + cols[None, :]
        for h in tl.static_range(HEADS + KV_HEADS):
            x1 = tl.load(src + h * D, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + h * D + HALF, mask=mask, other=0.0).to(tl.float32)
            r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)[:, None]
            if h < HEADS:
                g = tl.load(gain + h).to(tl.bfloat16).to(tl.float32)
                dst = q_out + rows[:, None] * (HEADS * D) + h * D + cols[None, :]
            else:
                g = 1.0
                dst = k_out + rows[:, None] * (KV_HEADS * D) + (h - HEADS) * D + cols[None, :]
            y1 = (x1 * r * g).to(tl.bfloat16).to(tl.float32)
            y2 = (x2 * r * g).to(tl.bfloat16).to(tl.float32)
            tl.store(dst, (y1 * c - y2 * s).to(tl.bfloat16), mask=mask)
            tl.store(dst + HALF, (y1 * s + y2 * c).to(tl.bfloat16), mask=mask)
        vcols = tl.arange(0, KV_HEADS * D)
        v = tl.load(qkv + rows[:, None] * WIDTH + (HEADS + KV_HEADS) * D + vcols[None, :], mask=mask)
        tl.store(v_out + rows[:, None] * (KV_HEADS * D) + vcols[None, :], v, mask=mask)

    @triton.jit
    def _qk_norm_rotary_bwd(qkv, gain, cos, sin, dq, dk, dv, dqkv, dgain_parts, n_rows, seq_len, eps,
                            dq_b, dq_t, dq_h, dk_b, dk_t, dk_h, dv_b, dv_t, dv_h,
                            HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
        D: tl.constexpr = 2 * HALF
        WIDTH: tl.constexpr = (HEADS + 2 * KV_HEADS) * D
        pid = tl.program_id(0)
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, HALF)
        mask = (rows < n_rows)[:, None]
        pos, seq = rows % seq_len, rows // seq_len
        c, s = _rotary_tables(cos, sin, pos, cols, mask, HALF)
        src = qkv + rows[:, None] * WIDTH + cols[None, :]
        dst = dqkv + rows[:, None] * WIDTH + cols[None, :]
        for h in tl.static_range(HEADS + KV_HEADS):
            x1 = tl.load(src + h * D, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + h * D + HALF, mask=mask, other=0.0).to(tl.float32)
            r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)[:, None]
            n1, n2 = x1 * r, x2 * r
            if h < HEADS:
                g = tl.load(gain + h).to(tl.bfloat16).to(tl.float32)
                grad = dq + seq[:, None] * dq_b + pos[:, None] * dq_t + h * dq_h + cols[None, :]
            else:
                g = 1.0
                grad = dk + seq[:, None] * dk_b + pos[:, None] * dk_t + (h - HEADS) * dk_h + cols[None, :]
            o1 = tl.load(grad, mask=mask, other=0.0).to(tl.float32)
            o2 = tl.load(grad + HALF, mask=mask, other=0.0).to(tl.float32)
            dy1, dy2 = o1 * c + o2 * s, o2 * c - o1 * s  # the rotation's transpose
            if h < HEADS:
                tl.store(dgain_parts + pid * HEADS + h, tl.sum(dy1 * n1 + dy2 * n2))
            dn1, dn2 = dy1 * g, dy2 * g
            proj = (tl.sum(dn1 * n1, 1) + tl.sum(dn2 * n2, 1))[:, None] / D
            tl.store(dst + h * D, ((dn1 - n1 * proj) * r).to(tl.bfloat16), mask=mask)
            tl.store(dst + h * D + HALF, ((dn2 - n2 * proj) * r).to(tl.bfloat16), mask=mask)
        vcols = tl.arange(0, KV_HEADS * D)
        grad = dv + seq[:, None] * dv_b + pos[:, None] * dv_t + (vcols // D)[None, :] * dv_h + (vcols % D)[None, :]
        tl.store(dqkv + rows[:, None] * WIDTH + (HEADS + KV_HEADS) * D + vcols[None, :], tl.load(grad, mask=mask), mask=mask)

    _QK_BLOCK = 32
    _F32_EPS = torch.finfo(torch.float32).eps

    def _qk_outputs(qkv, gain, cos, sin, heads):
        (b, t, _), (head_dim, kv_heads) = qkv.shape, qkv_layout(qkv, cos, heads)
        return qkv.new_empty(b, t, heads, head_dim), *(qkv.new_empty(b, t, kv_heads, head_dim) for _ in range(2))

    @torch.library.custom_op("pgolf::qk_norm_rotary", mutates_args=())
    def _qk_norm_rotary_op(qkv: torch.Tensor, gain: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = _qk_outputs(qkv, gain, cos, sin, heads)
        b, t, _ = qkv.shape
        grid = (triton.cdiv(b * t, _QK_BLOCK),)
        _qk_norm_rotary_fwd[grid](qkv, gain, cos, sin, q, k, v, b * t, t, _F32_EPS,
                                  heads, k.size(2), cos.size(-1), _QK_BLOCK)
        return q, k, v

    _qk_norm_rotary_op.register_fake(_qk_outputs)

    @torch.library.custom_op("pgolf::qk_norm_rotary_backward", mutates_args=())
    def _qk_norm_rotary_backward_op(qkv: torch.Tensor, gain: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = qkv.shape
        heads, kv_heads, half = dq.size(2), dk.size(2), cos.size(-1)
        dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
        grid = (triton.cdiv(b * t, _QK_BLOCK),)
        dqkv = torch.empty_like(qkv)
        parts = torch.empty(grid[0], heads, device=qkv.device, dtype=torch.float32)
        _qk_norm_rotary_bwd[grid](qkv, gain, cos, sin, dq, dk, dv, dqkv, parts, b * t, t, _F32_EPS,
                                  *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
                                  heads, kv_heads, half, _QK_BLOCK)
        return dqkv, parts.sum(0).to(gain.dtype)

    @_qk_norm_rotary_backward_op.register_fake
    def _(qkv, gain, cos, sin, dq, dk, dv):
        return torch.empty_like(qkv), torch.empty_like(gain)

    def _qk_norm_rotary_setup(ctx, inputs, output):
        qkv, gain, cos, sin, _ = inputs
        ctx.save_for_backward(qkv, gain, cos, sin)

    def _qk_norm_rotary_grad(ctx, dq, dk, dv):
        dqkv, dgain = torch.ops.pgolf.qk_norm_rotary_backward(*ctx.saved_tensors, dq, dk, dv)
        return dqkv, dgain, None, None, None

    _qk_norm_rotary_op.register_autograd(_qk_norm_rotary_grad, setup_context=_qk_norm_rotary_setup)


def qk_kernels_fit(head_dim: int, kv_heads: int) -> bool:
    """The kernels' tiles need power-of-two widths: half a head, and v's heads together."""
    return all(n > 0 and n & (n - 1) == 0 for n in (head_dim // 2, kv_heads * head_dim))


def qk_norm_rotary(qkv: torch.Tensor, gain: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qk_norm_rotary_reference, through the Triton kernels for bf16 on a GPU where their tiles fit."""
    if triton_runs(qkv) and qk_kernels_fit(*qkv_layout(qkv, cos, heads)):
        return torch.ops.pgolf.qk_norm_rotary(qkv, gain, cos[:, : qkv.size(1)], sin[:, : qkv.size(1)], heads)
    return qk_norm_rotary_reference(qkv, gain, cos, sin, heads)


# cuDNN's fused attention ran 1.5x flash's at the training shape on H100 (tools/bench.py attention).
# Asking for it first changed no step time on torch 2.11, which likely picks it already; the order
# says what we want on any version, and the others stay as fallbacks for shapes cuDNN does not take.
SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# cuDNN builds a plan for each new shape. Per-document LoRA asks for flash first: its eager steps changed
# shape at nearly every step; its padded steps (about 35 shapes) were measured so.
SDPA_ANY_SHAPE = SDPA_PRIORITY[1:]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, priority=SDPA_PRIORITY) -> torch.Tensor:
    """Causal grouped-query attention on (batch, time, heads, head_dim) tensors."""
    if flash_attn_3 is not None and q.is_cuda and q.dtype != torch.float32:  # fp32: GPTQ's calibration
        return flash_attn_3(q, k, v, causal=True)
    with sdpa_kernel(priority, set_priority=True):
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


def exclusive(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA: each head's output y (b, t, heads, d) without its component along the token's own value
    vector v (b, t, kv_heads, d), so attention carries what the token does not already hold. Query heads
    are grouped over their shared kv head by a reshape, not by copying v."""
    yg = y.unflatten(2, (v.size(2), -1))
    vn = F.normalize(v.float(), dim=-1).unsqueeze(3)
    return (yg - (yg.float() * vn).sum(-1, keepdim=True) * vn).to(y.dtype).flatten(2, 3)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, rope_base: float, qk_gain: float, max_seq_len: int,
                 rope_dims: int = 0, xsa: bool = False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.xsa = heads, kv_heads, dim // heads, xsa
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((heads,), qk_gain))
        cos, sin = rotary_tables(max_seq_len, self.head_dim, rope_base, rope_dims)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        b, t, d = x.shape
        # One matmul for q, k and v reads x once; the three stay separate matrices for Muon and packing.
        qkv = F.linear(x, torch.cat((self.q.weight, self.k.weight, self.v.weight)))
        if lora is not None:
            qkv = qkv + lora("qkv", x)
        q, k, v = qk_norm_rotary(qkv, self.q_gain, self.cos, self.sin, self.heads)
        y = causal_attention(q, k, v, SDPA_PRIORITY if lora is None else SDPA_ANY_SHAPE)
        out = self.proj((exclusive(y, v) if self.xsa else y).reshape(b, t, d))
        return out if lora is None else out + lora("attn", x)


# The MLP's activation, act(h)^2 with act = leaky_relu(., NEG_SLOPE) (relu at 0), inside the matmuls
# around it. Plain, the MLP writes h and act(h)^2 forward, and the gradients at act(h)^2 and at h
# backward, each a full pass of (tokens x hidden) through memory (~500 us per layer and micro-batch on
# H100). Here the up-projection's epilogue writes act(h)^2 (and, for a leaky slope, act(h) itself: the
# square loses the sign the gradient needs), and the backward's first matmul multiplies by the
# derivative 2 act(h) act'(h) in its epilogue: 2 sqrt(relu(h)^2) for relu.
if triton is not None:

    @triton.jit
    def _act2_matmul_kernel(a, b, c, aux, M, N: tl.constexpr, K: tl.constexpr, BACKWARD: tl.constexpr,
                            SLOPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            PROGRAMS: tl.constexpr, ROUNDS: tl.constexpr):
        # Persistent: each program walks tiles PROGRAMS apart; in the last round the spare programs redo
        # the last tile (same values), which keeps every loop bound a compile-time constant.
        tiles_n: tl.constexpr = (N + BN - 1) // BN
        last = tl.cdiv(M, BM) * tiles_n - 1
        for i in tl.range(0, ROUNDS, flatten=True):
            tile = tl.minimum(tl.program_id(0) + i * PROGRAMS, last)
            row, col = (tile // tiles_n) * BM, (tile % tiles_n) * BN
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):
                acc = tl.dot(a.load([row, k]), b.load([k, col]), acc)
            # Rounded to bf16 first, as the plain path stores h and the gradient at act(h)^2.
            acc = acc.to(c.dtype).to(tl.float32)
            if BACKWARD:
                saved = aux.load([row, col]).to(tl.float32)
                if SLOPE == 0.0:
                    out = acc * 2.0 * tl.sqrt(saved)
                else:
                    out = acc * 2.0 * saved * tl.where(saved > 0, 1.0, SLOPE)
            else:
                act = tl.where(acc > 0, acc, acc * SLOPE).to(c.dtype)
                if SLOPE != 0.0:
                    aux.store([row, col], act)
                act = act.to(tl.float32)
                out = act * act
            c.store([row, col], out.to(c.dtype))


def act2_reference(h: torch.Tensor, slope: float) -> torch.Tensor:
    return F.leaky_relu(h, slope) if slope else torch.relu(h)


@torch.library.custom_op("pgolf::act2_matmul", mutates_args=())
def act2_matmul(a: torch.Tensor, b: torch.Tensor, aux: torch.Tensor | None, slope: float) -> torch.Tensor:
    """act(a @ b)^2; or, given aux from the forward (act(h)^2 for relu, act(h) for a leaky slope), (a @ b)
    times 2 act(h) act'(h), the gradient at h. Off the GPU, the same in PyTorch (the reference the tests
    check ActSquaredMLP's backward with)."""
    if not triton_runs(a):
        y = (a.float() @ b.float()).to(a.dtype).float()
        if aux is None:
            return act2_reference(y, slope).to(a.dtype).float().square().to(a.dtype)
        saved = aux.float()
        return (y * 2 * (saved.sqrt() if slope == 0 else saved * torch.where(saved > 0, 1.0, slope))).to(a.dtype)
    return _act2_matmul_launch(a, b, aux, slope, None)


def _act2_matmul_launch(a, b, aux, slope, act_out):
    (m, k), n = a.shape, b.size(1)
    bm, bn, bk = 128, 128, 64
    out = a.new_empty(m, n)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    programs = min(tiles, torch.cuda.get_device_properties(a.device).multi_processor_count)
    desc = TensorDescriptor.from_tensor
    second = aux if aux is not None else (act_out if act_out is not None else out)
    _act2_matmul_kernel[(programs,)](desc(a, [bm, bk]), desc(b, [bk, bn]), desc(out, [bm, bn]), desc(second, [bm, bn]),
                                     m, n, k, aux is not None, float(slope), bm, bn, bk, programs,
                                     triton.cdiv(tiles, programs), num_warps=4, num_stages=5)
    return out


@act2_matmul.register_fake
def _(a, b, aux, slope):
    return a.new_empty(a.size(0), b.size(1))


@torch.library.custom_op("pgolf::leaky2_matmul", mutates_args=())
def leaky2_matmul(a: torch.Tensor, b: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(a @ b)^2, act(a @ b)) for a leaky slope, both from one pass: the backward needs act's sign."""
    if not triton_runs(a):
        act = act2_reference((a.float() @ b.float()).to(a.dtype), slope)
        return act.float().square().to(a.dtype), act
    act = a.new_empty(a.size(0), b.size(1))
    return _act2_matmul_launch(a, b, None, slope, act), act


@leaky2_matmul.register_fake
def _(a, b, slope):
    return a.new_empty(a.size(0), b.size(1)), a.new_empty(a.size(0), b.size(1))


class ActSquaredMLP(torch.autograd.Function):
    """act(x @ up)^2 @ down.T for x (tokens, dim), up and down (dim, hidden), all bf16."""

    @staticmethod
    def forward(ctx, x, up, down, slope):
        post, saved = leaky2_matmul(x, up, slope) if slope else (act2_matmul(x, up, None, 0.0),) * 2
        ctx.slope = slope
        ctx.save_for_backward(x, up, down, post, saved)
        return post @ down.t()

    @staticmethod
    def backward(ctx, grad):
        x, up, down, post, saved = ctx.saved_tensors
        grad = grad.contiguous()
        grad_h = act2_matmul(grad, down, saved, ctx.slope)
        needs = ctx.needs_input_grad  # frozen weights (LoRA TTT) skip two of the four matmuls
        return grad_h @ up.t(), x.t() @ grad_h if needs[1] else None, grad.t() @ post if needs[2] else None, None


class MLP(nn.Module):
    def __init__(self, dim: int, mult: float, neg_slope: float = 0.0):
        super().__init__()
        hidden = int(mult * dim)
        self.neg_slope = neg_slope
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """frozen: the weights take no gradient (LoRA TTT's steps, whose padded shapes give the Triton kernel,
        compiled once per row count, a few powers of two to compile for)."""
        x = x.to(stream_dtype(x.device))  # what autocast's matmuls would take anyway
        # The Triton path also needs widths of whole 16-byte rows (for the TMA copy engine).
        if triton_runs(x) and x.size(-1) % 8 == 0 and self.fc.out_features % 8 == 0:
            fc, proj = (self.fc.weight.detach(), self.proj.weight.detach()) if frozen else (self.fc.weight, self.proj.weight)
            up, down = fc.to(x.dtype).t().contiguous(), proj.to(x.dtype)
            return ActSquaredMLP.apply(x.flatten(0, -2), up, down, self.neg_slope).view(*x.shape[:-1], -1)
        return self.proj(act2_reference(self.fc(x), self.neg_slope).square())


class Block(nn.Module):
    """Attention then MLP, each on the RMS-normalized stream times norm_scale (LN scale: 1/sqrt(layer+1) damps
    deeper blocks' inputs), or both on the same input (parallel) and added together."""

    def __init__(self, dim: int, heads: int, kv_heads: int, mlp_mult: float, rope_base: float, qk_gain: float,
                 max_seq_len: int, rope_dims: int = 0, xsa: bool = False, norm_scale: float = 1.0,
                 parallel: bool = False, neg_slope: float = 0.0):
        super().__init__()
        self.attn = Attention(dim, heads, kv_heads, rope_base, qk_gain, max_seq_len, rope_dims, xsa)
        self.mlp = MLP(dim, mlp_mult, neg_slope)
        self.norm_scale, self.parallel = norm_scale, parallel
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        # Learned mix of the running residual with the first layer's input (starts as pure residual).
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(dim), torch.zeros(dim)]))

    def forward(self, x: torch.Tensor, x0: torch.Tensor, lora=None) -> torch.Tensor:
        """lora: a DocAdapters delta function, or None."""
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        a = self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.norm_scale, lora)
        h = rms_norm(x if self.parallel else x + a) * self.norm_scale
        m = self.mlp(h) if lora is None else self.mlp(h, frozen=True) + lora("mlp", h)
        return x + a + self.mlp_scale.to(x.dtype) * m


class SmearGate(nn.Module):
    """Blend each token's embedding with its predecessor's through a learned per-channel gate; a
    document's first token (BOS) and the first position keep their own embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        blended = torch.lerp(x, prev, torch.sigmoid(self.gate).to(x.dtype))
        return torch.where(starts[..., None], x, blended)


class BigramHash(nn.Module):
    """An embedding of the hashed (previous token, token) pair, projected to the model width; document
    starts use a bucket of their own."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.table = nn.Embedding(buckets, dim)
        self.proj = nn.Linear(dim, model_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket(self, ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        prev = F.pad(ids[:, :-1], (1, 0))
        h = ((prev * 0x9E3779B1) ^ (ids * 0x85EBCA77)) % (self.buckets - 1)
        return torch.where(starts, self.buckets - 1, h)

    def forward(self, ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        return self.scale * self.proj(self.table(self.bucket(ids, starts)))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, num_layers: int, model_dim: int, num_heads: int, num_kv_heads: int,
                 mlp_mult: float, rope_base: float = 10000.0, qk_gain_init: float = 1.5, logit_softcap: float = 30.0,
                 bigram_vocab_size: int = 0, bigram_dim: int = 128, bos_id: int = 1, max_seq_len: int = 2048,
                 tied_embed_init_std: float = 0.005, smear_gate: bool = True, rope_dims: int = 0, xsa_last_n: int = 0,
                 ln_scale: bool = False, parallel_last_n: int = 0, mlp_neg_slope: float = 0.0, skip_gates: bool = False,
                 loop_layers: tuple[int, int] = (0, 0), loop_repeats: int = 0):
        super().__init__()
        if model_dim % num_heads or num_heads % num_kv_heads or (model_dim // num_heads) % 2:
            raise SetupError(f"MODEL_DIM={model_dim} must split into NUM_HEADS={num_heads} heads of even width, "
                             f"and NUM_HEADS into NUM_KV_HEADS={num_kv_heads} groups")
        if bigram_vocab_size == 1:
            raise SetupError("BIGRAM_VOCAB_SIZE=1 leaves no bucket for pairs: use 0 (off) or at least 2")
        self.bos_id, self.logit_softcap = bos_id, logit_softcap
        self.tok_emb = nn.Embedding(vocab_size, model_dim)
        self.bigram = BigramHash(bigram_vocab_size, bigram_dim, model_dim) if bigram_vocab_size > 0 else None
        self.smear = SmearGate(model_dim) if smear_gate else None
        self.blocks = nn.ModuleList(
            Block(model_dim, num_heads, num_kv_heads, mlp_mult, rope_base, qk_gain_init, max_seq_len, rope_dims,
                  xsa=i >= num_layers - xsa_last_n, norm_scale=(i + 1) ** -0.5 if ln_scale else 1.0,
                  parallel=i >= num_layers - parallel_last_n, neg_slope=mlp_neg_slope)
            for i in range(num_layers))
        # Depth recurrence: blocks first..last run 1 + loop_repeats times in a row once `looping` is set
        # (weights shared, so no bytes). The plain order is used until then.
        first, last = loop_layers
        looped = list(range(last + 1)) + list(range(first, last + 1)) * loop_repeats + list(range(last + 1, num_layers))
        self.orders = {False: list(range(num_layers)), True: looped if loop_repeats else list(range(num_layers))}
        self.looping = False
        # U-Net: the first half of the (virtual) layers feed the second half, last in first out; with skip
        # gates a decoder input is a learned per-channel blend of skip and stream instead of their sum.
        skips = len(self.orders[True]) // 2
        self.skip_weights = nn.Parameter(torch.ones(skips, model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(skips, model_dim)) if skip_gates else None
        self.head_input = nn.Identity()  # names the tied head's input, for GPTQ's calibration hooks
        self._init_weights(num_layers, tied_embed_init_std)

    def _init_weights(self, num_layers: int, embed_std: float) -> None:
        nn.init.normal_(self.tok_emb.weight, std=embed_std)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.orthogonal_(module.weight)
                if name.endswith("proj"):  # residual outputs shrink with depth so the stream starts tame
                    module.weight.data.mul_((2 * num_layers) ** -0.5)
        if self.bigram is not None:
            nn.init.normal_(self.bigram.table.weight, std=0.02)
            nn.init.zeros_(self.bigram.proj.weight)

    def skip_in(self, j: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        skip = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + skip
        return torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))

    def forward(self, ids: torch.Tensor, targets: torch.Tensor, lora: DocAdapters | None = None) -> torch.Tensor:
        """Per-token cross-entropy in nats, shape of targets; with `lora`, each sequence is a document with its
        own adapters."""
        h = self.head_input(rms_norm(self.last_hidden(ids, lora)))
        logits = self.head_logits(h, None if lora is None else lora.at(None))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)

    def last_hidden(self, ids: torch.Tensor, lora: DocAdapters | None = None) -> torch.Tensor:
        """The last block's output at every position, before the final norm."""
        starts = ids == self.bos_id
        starts[:, 0] = True
        x = self.tok_emb(ids).to(stream_dtype(ids.device))
        if self.bigram is not None:
            x = x + self.bigram(ids, starts)
        if self.smear is not None:
            x = self.smear(x, starts)
        x = x0 = rms_norm(x).to(x.dtype)
        order = self.orders[self.looping]
        encoder, skips = len(order) // 2, []
        for pos, i in enumerate(order):
            if pos >= encoder and skips:
                x = self.skip_in(pos - encoder, x, skips.pop())
            x = self.blocks[i](x, x0, None if lora is None else lora.at(pos))
            if pos < encoder:
                skips.append(x)
        return x

    def head_logits(self, h: torch.Tensor, lora=None) -> torch.Tensor:
        """Soft-capped fp32 logits of the tied head from its (normed) input (plus a DocAdapters delta)."""
        logits = F.linear(h, self.tok_emb.weight).float()
        if lora is not None:
            logits = logits + lora("head", h).float()
        return self.logit_softcap * torch.tanh(logits / self.logit_softcap)


def build_model(args, bos_id: int) -> GPT:
    return GPT(args.vocab_size, args.num_layers, args.model_dim, args.num_heads, args.num_kv_heads, args.mlp_mult,
               args.rope_base, args.qk_gain_init, args.logit_softcap, args.bigram_vocab_size, args.bigram_dim, bos_id,
               max(args.train_seq_len, args.eval_seq_len), args.tied_embed_init_std, bool(args.smear_gate),
               args.rope_dims, args.xsa_last_n, bool(args.ln_scale), args.parallel_last_n, args.mlp_neg_slope,
               bool(args.skip_gates), (args.loop_first, args.loop_last), args.loop_repeats)


# -----------------------------------------------------------------------------
# Training


def accumulate_gradients(model: nn.Module, batches, micro_steps: int, device: torch.device) -> torch.Tensor:
    """Backward over `micro_steps` micro-batches so the gradient is their mean; under DDP the
    all-reduce runs only on the last one. Returns the mean loss."""
    total = torch.zeros((), device=device)
    for i in range(micro_steps):
        x, y = next(batches)
        if isinstance(model, DDP):
            model.require_backward_grad_sync = i == micro_steps - 1
        with autocast(device):
            loss = model(x, y).mean()
        (loss / micro_steps).backward()
        total += loss.detach()
    return total / micro_steps


def device_mark(device: torch.device):
    """A point in the device's queue of work, to time it without waiting for it: a recorded CUDA event, or on
    the CPU (which runs each op as it is called) the host clock."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def seconds_between(a, b) -> float:
    """Seconds from device_mark a to b (CUDA events once the GPU has passed b)."""
    return b - a if isinstance(a, float) else a.elapsed_time(b) / 1000


class StepClock:
    """Milliseconds of training at device_marks, so the end of one step can be read while the next is queued.
    restart() continues from a given time after a pause that is not training (validation)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.restart(0.0)

    def restart(self, ms: float) -> None:
        sync_time(self.device)
        self.base_ms, self.start = ms, device_mark(self.device)

    def ms(self, mark) -> float:
        """The time at the mark, once the GPU has reached it."""
        if not isinstance(mark, float):
            mark.synchronize()
        return self.base_ms + 1000 * seconds_between(self.start, mark)


class Logger:
    def __init__(self, path: Path | None):
        self.file = open(path, "w", encoding="utf-8") if path else None

    def __call__(self, msg: str) -> None:
        if self.file:
            print(msg, flush=True)
            self.file.write(msg + "\n")
            self.file.flush()


# A run's results. Each is written under a ".partial" name and renamed into place (atomic) only when the
# final score is known, just before the final_score line: a run that stops part-way leaves none of them.
OUTPUT_NAMES = ("final_model.ptz", "submission.json")


def partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def remove_outputs(out_dir: Path) -> None:
    for name in OUTPUT_NAMES:
        for path in (out_dir / name, partial(out_dir / name)):
            path.unlink(missing_ok=True)


def open_log(out_dir: Path) -> Logger:
    """A fresh train.log in OUT_DIR. The previous run's results there go first: next to this run's log
    they would look like its own."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_outputs(out_dir)
        return Logger(out_dir / "train.log")
    except OSError as err:
        raise SetupError(f"OUT_DIR={str(out_dir)!r} cannot be written: {err}") from None


def mark_unfinished(out_dir: Path, log: Logger, err: BaseException) -> None:
    """The log of a run that stopped part-way ends with a line saying so and why; its results go."""
    if isinstance(err, Stopped):
        why = str(err)
    else:
        why = f"error: {err}" if isinstance(err, SetupError) else f"{type(err).__name__}: {err}"
    try:
        remove_outputs(out_dir)
        log("run did not finish: " + " ".join(why.split()))
    except OSError:  # a full disk may refuse the line too; the error that stopped the run matters more
        pass


def init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def main() -> None:
    args = Hyperparameters()
    rank, world, device = init_distributed()
    out_dir = Path(args.out_dir)
    log = open_log(out_dir) if rank == 0 else Logger(None)
    try:
        train_and_score(args, rank, world, device, out_dir, log)
    except BaseException as err:
        if rank == 0:
            mark_unfinished(out_dir, log, err)
        raise
    if world > 1:
        # Gloo's worker threads need the GIL to free a finished collective's tensors, and the group's
        # destructor joins them while holding it: a rank that tore the group down right after its last
        # collective hung at exit now and then (CPU tests, torch 2.13). After the barrier no collective
        # is left, and the sleep hands the GIL to the workers so they can free what they hold.
        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()


def train_and_score(args: Hyperparameters, rank: int, world: int, device: torch.device, out_dir: Path,
                    log: Logger) -> None:
    """Train, average, pack the artifact, score the model rebuilt from it alone, and write the results."""
    eval_seq_len = args.eval_seq_len or args.train_seq_len
    micro_steps = args.grad_accum_steps or 8 // world
    local_tokens = args.train_batch_tokens // (world * micro_steps)
    log(f"run {args.run_id} on {socket.gethostname()}: world_size={world} grad_accum={micro_steps} "
        f"micro_batch={local_tokens // args.train_seq_len}x{args.train_seq_len} device={device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else " (no CUDA device: CPU, for smoke runs only)"))
    for key, value in _SETTINGS.items():
        log(f"setting {key}={value}")
    for warning in unknown_settings():
        log(f"WARNING: {warning}")
    quant_bits, quant_clips = parse_quant_bits(args.quant_bits), parse_quant_clip(args.quant_clip)
    codec_names(args.compressor)  # zstd without zstandard installed fails now, not after training
    budget_s = args.max_wallclock_seconds
    if args.gptq_calib_seqs and budget_s > 0:
        # GPTQ's calibration reads training tokens, so it belongs to the training time: training stops earlier.
        args.max_wallclock_seconds = budget_s - args.gptq_reserve_seconds
        log(f"training cap: {args.max_wallclock_seconds:g}s ({args.gptq_reserve_seconds:g}s of the {budget_s:g}s "
            "reserved for GPTQ calibration)")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if not Path(args.tokenizer_path).is_file():
        raise SetupError(f"TOKENIZER_PATH={args.tokenizer_path} not found: fetch the challenge's tokenizer with "
                         "data/cached_challenge_fineweb.py, or point TOKENIZER_PATH at a SentencePiece .model file")
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer_path)
    if sp.vocab_size() != args.vocab_size:
        raise SetupError(f"{args.tokenizer_path} has {sp.vocab_size()} pieces but VOCAB_SIZE={args.vocab_size}: "
                         f"set VOCAB_SIZE={sp.vocab_size()} or use the tokenizer that matches the shards")
    luts = byte_luts(sp, args.vocab_size, device)
    val_np = load_val_tokens(str(Path(args.data_path) / "fineweb_val_*.bin"), args.vocab_size, args.val_tokens_limit)
    val_tokens = torch.from_numpy(val_np.astype(np.int32)).to(device)
    check_against_val_split(args, val_tokens.numel())
    log(f"val tokens: {val_tokens.numel():,}" + (f" (VAL_TOKENS_LIMIT: a cut of the split, not a comparable score)"
                                                 if args.val_tokens_limit else ""))
    train_pattern = str(Path(args.data_path) / "fineweb_train_*.bin")
    log(f"train shards: {len(shard_paths(train_pattern))} under {args.data_path}")
    loader = DistributedTokenLoader(train_pattern, args.vocab_size, rank, world, device)

    base_model = build_model(args, sp.bos_id()).to(device)
    log(f"model: {sum(p.numel() for p in base_model.parameters()):,} parameters; attention: "
        + ("flash_attn_interface (FA3)" if flash_attn_3 is not None and device.type == "cuda" else "PyTorch SDPA, cuDNN first"))
    keep = [s.strip() for s in args.fp16_keep.split(",") if s.strip()]
    code_bytes = len(Path(__file__).read_bytes())
    payload = payload_bytes(base_model.state_dict(), quant_bits, keep, args.fp16_max_numel, quant_clips)
    log(f"quantized payload estimate: {payload:,} bytes + {code_bytes:,} code (cap {ARTIFACT_CAP_BYTES:,})")
    if 0.9 * payload + code_bytes > ARTIFACT_CAP_BYTES:
        log("WARNING: the artifact will likely end over the cap (compression would have to save over 10%): "
            "lower QUANT_BITS, widen QUANT_CLIP, or lower NUM_LAYERS, MODEL_DIM or MLP_MULT before spending the run")
    compiled = torch.compile(base_model, dynamic=False) if args.compile else base_model
    model = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False) if world > 1 else compiled
    optimizers = build_optimizers(base_model, args)
    batches = iter(lambda: loader.next_batch(local_tokens, args.train_seq_len), None)

    def train_step(step: int, elapsed_ms: float) -> tuple[torch.Tensor, float]:
        looping = args.loop_repeats > 0 and training_progress(step, elapsed_ms, args) >= args.loop_start_frac
        if looping and not base_model.looping and elapsed_ms > 0:  # elapsed 0: the compile warm-up
            log(f"step:{step} depth recurrence on: blocks {args.loop_first}-{args.loop_last} run {1 + args.loop_repeats} times")
        base_model.looping = looping
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, batches, micro_steps, device)
        lr_mul = lr_multiplier(step, elapsed_ms, args)
        optimizers[1].param_groups[0]["momentum"] = muon_momentum(step, args)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_mul
        if args.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(base_model.parameters(), args.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        return loss, lr_mul

    # Compile warm-up: real steps, then every weight, optimizer state and the data stream rewound.
    if args.warmup_steps > 0:
        saved_model = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        saved_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        t0 = sync_time(device)
        for i in range(args.warmup_steps):  # the second half with looped layers, if any: both graphs compile now
            train_step(args.iterations if 2 * i >= args.warmup_steps else 0, 0.0)
        base_model.load_state_dict(saved_model)
        for opt, state in zip(optimizers, saved_opts):
            opt.load_state_dict(state)
        loader.reset()
        log(f"warm-up: {args.warmup_steps} steps in {sync_time(device) - t0:.1f}s (compile), state restored")

    cap_ms = 1000 * args.max_wallclock_seconds
    clock_group = dist.new_group(backend="gloo") if world > 1 else None

    def agreed(ms: float) -> float:
        """The largest time over ranks, so every rank takes the same LR and stop decision. A CPU collective:
        one on the GPU would have to wait for the step in flight."""
        if clock_group is None:
            return ms
        t = torch.tensor(ms, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=clock_group)
        return t.item()

    def finish(step: int, lr_mul: float, loss: torch.Tensor, mark, last: bool) -> float:
        """Wait for a queued step, log it, and return the training time at its end."""
        ms = agreed(clock.ms(mark))
        if args.train_log_every and (step % args.train_log_every == 0 or step <= 10 or last):
            step_ms = ms / step
            left_ms = max(cap_ms - ms, 0.0)
            steps_left = min(args.iterations - step, int(left_ms / step_ms)) if cap_ms > 0 else args.iterations - step
            log(f"step:{step}/{args.iterations} train_loss:{loss.item():.4f} lr_mul:{lr_mul:.3f} "
                f"train_time:{ms:.0f}ms step_avg:{step_ms:.2f}ms steps_left:~{steps_left}"
                + (f" time_left:{left_ms / 1000:.1f}s" if cap_ms > 0 else ""))
        return ms

    # The loop never waits for the step it has just queued: it finishes the one before, which the GPU has
    # done by then, and predicts that the one in flight takes as long. Waiting for the step just queued
    # would leave the GPU idle while the CPU queues the next (~3 ms a step on H100).
    averager = WeightAverager(base_model, args.ema_decay, args.swa_start_frac, args.swa_every)
    clock = StepClock(device)
    train_ms, step_ms, predicted_ms, step, in_flight, last = 0.0, 0.0, 0.0, 0, None, False
    while not last:
        loss, lr_mul = train_step(step, predicted_ms)
        step += 1
        averager.update(base_model, step, lr_mul)
        if world > 1:  # the whole batch's loss, as one process would log it
            dist.all_reduce(loss)
            loss /= world
        queued = (step, lr_mul, loss.to("cpu", non_blocking=True), device_mark(device))
        if in_flight:
            before_ms, train_ms = train_ms, finish(*in_flight, last=False)
            step_ms = train_ms - before_ms
        in_flight = queued
        predicted_ms = train_ms + step_ms  # the end of the step in flight
        last = step == args.iterations or 0 < cap_ms <= predicted_ms
        validate = args.val_loss_every and step % args.val_loss_every == 0 and not last
        if last or validate:
            before_ms, train_ms = train_ms, finish(*in_flight, last=last)
            step_ms, predicted_ms, in_flight = train_ms - before_ms, train_ms, None
        if validate:
            vl, vb = evaluate(compiled, val_tokens, args.train_seq_len, 0, args.eval_batch_seqs, luts, rank, world)
            log(f"step:{step} val_loss:{vl:.4f} val_bpb:{vb:.4f} (plain, current weights)")
            clock.restart(train_ms)  # validation time is not training time
    log(f"training: {step} steps in {train_ms / 1000:.1f}s ({train_ms / max(step, 1):.2f}ms/step)"
        + (f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""))

    averaged, how = averager.averaged(base_model)
    hessians, sensitivities = {}, {}
    if args.gptq_calib_seqs:
        # Right after training, inside its budget: the training stream's next sequences, each rank its
        # share, through an uncompiled fp32 copy of the averaged weights (the ones to be quantized).
        t_calib = sync_time(device)
        share = -(-args.gptq_calib_seqs // world)
        x, y = loader.next_batch(share * args.train_seq_len, args.train_seq_len)
        calib_model = copy.deepcopy(base_model)
        calib_model.load_state_dict(averaged)
        hessians = collect_hessians(calib_model, x, y)
        if args.quant_alloc:  # one micro-batch per rank: a sum over a million weights needs few tokens
            generator = torch.Generator(device).manual_seed(args.seed + rank)
            sensitivities = weight_sensitivities(calib_model, x[:CALIB_BATCH_SEQS], generator)
        del calib_model
        calib_s = sync_time(device) - t_calib
        log(f"gptq calibration: {share * world} training sequences ({share * world * args.train_seq_len:,} tokens), "
            f"{len(hessians)} matrices" + (f", sensitivities of {len(sensitivities)}" if sensitivities else "")
            + f", in {calib_s:.2f}s; training + calibration {train_ms / 1000 + calib_s:.1f}s"
            + (f" of {budget_s:g}s" if budget_s > 0 else ""))
        if 0 < budget_s < train_ms / 1000 + calib_s:
            log("WARNING: calibration ended past MAX_WALLCLOCK_SECONDS: raise GPTQ_RESERVE_SECONDS")

    vl, vb = evaluate(compiled, val_tokens, args.train_seq_len, 0, args.eval_batch_seqs, luts, rank, world)
    log(f"final weights: val_loss:{vl:.4f} val_bpb:{vb:.4f} (plain)")
    log(f"weight averaging: {how}")
    base_model.load_state_dict(averaged)
    pre_loss, pre_bpb = evaluate(compiled, val_tokens, args.train_seq_len, 0, args.eval_batch_seqs, luts, rank, world)
    log(f"pre-quantization (averaged weights): val_loss:{pre_loss:.4f} val_bpb:{pre_bpb:.4f} (plain)")

    # Compress, write the artifact, then score a fresh model rebuilt from that file alone.
    artifact = partial(out_dir / "final_model.ptz")
    if rank == 0:
        t_pack = time.perf_counter()
        blob, report = pack_model(averaged, quant_bits, keep, args.fp16_max_numel, args.compressor, quant_clips, hessians,
                                  sensitivities, args.quant_alloc, block=args.gptq_block, damp=args.gptq_damp,
                                  act_order=bool(args.gptq_act_order))
        artifact.write_bytes(blob)
        if zstandard is None:
            log("compression: zstandard is not installed, lzma only")
        for row in report:
            log(f"quant group:{row['group']:<6} tensors:{row['tensors']:>3} params:{row['params']:>11,} bits:{row['bits']:>2} "
                f"raw:{row['raw']:>11,} compressed:{row['bytes']:>11,} ({row['codec']})"
                + (f" clip:{row['clip']} gptq:{row['gptq']}" if "clip" in row else "")
                + (f" output error gptq:{row['gptq_err']:.3g} rtn:{row['rtn_err']:.3g}" if row.get("gptq") else ""))
        log(f"quantization and packing took {time.perf_counter() - t_pack:.1f}s")
    if world > 1:
        dist.barrier()
    model_bytes = artifact.stat().st_size
    log(f"artifact: {code_bytes + model_bytes:,} bytes = {code_bytes:,} code + {model_bytes:,} model "
        f"(cap {ARTIFACT_CAP_BYTES:,}, {ARTIFACT_CAP_BYTES - code_bytes - model_bytes:,} to spare)")
    bytes_total = check_artifact_size(code_bytes, model_bytes, bool(args.allow_over_cap))

    t_eval = sync_time(device)
    fresh = build_model(args, sp.bos_id()).to(device)
    fresh.looping = base_model.looping
    fresh.load_state_dict(unpack_model(artifact.read_bytes()))
    scorer = torch.compile(fresh, dynamic=False) if args.compile else fresh
    q_loss, q_bpb = evaluate(scorer, val_tokens, eval_seq_len, 0, args.eval_batch_seqs, luts, rank, world)
    log(f"round trip: val_loss:{q_loss:.4f} val_bpb:{q_bpb:.4f} (plain, seq_len {eval_seq_len}) "
        f"quantization cost {q_bpb - pre_bpb:+.4f} bpb")
    mode = "sliding" if args.eval_stride else "plain"
    if args.ttt_epochs or args.ttt_lora_rank:
        # Replaces the sliding score: the same windows, or each document alone (LoRA), each chunk scored first.
        mode = ("docs+lora" if args.ttt_lora_rank else mode) + ("+ttt" if args.ttt_epochs else "")
        q_loss, q_bpb, score_s, adapt_s = evaluate_ttt(scorer, ttt_parameters(fresh, args.ttt_freeze_blocks), val_tokens,
                                                       eval_seq_len, args.eval_stride, luts, args, rank, world, fresh)
        how = [f"seq_len {eval_seq_len}" + ("" if args.ttt_lora_rank else f" stride {args.eval_stride or eval_seq_len}")]
        chunk = ttt_chunk_tokens(args, val_tokens.numel())
        how += [f"{args.ttt_phases} phases of {chunk} tokens" if args.ttt_phases else f"chunks of {chunk} tokens"] if args.ttt_epochs else []
        how += [f"LoRA rank {args.ttt_lora_rank} on {args.ttt_lora_chunk}-token document chunks"] if args.ttt_lora_rank else []
        log(f"round trip: val_loss:{q_loss:.4f} val_bpb:{q_bpb:.4f} ({mode}, {', '.join(how)})")
        # Both parts split over ranks (windows or documents, and each step's sequences), so 8 GPUs take about
        # world/8 of the time; chunked SGD less well, as its all-reduces do not shrink and its per-GPU batches do;
        # LoRA less well too, as a batch takes as many steps as its longest document has chunks.
        more = "LoRA: more, a rank waits for its longest documents; its adapter steps count as scoring" if args.ttt_lora_rank else "adaptation likely more"
        log(f"ttt time on {world} rank(s): scoring {score_s:.1f}s + adaptation {adapt_s:.1f}s; on 8 GPUs about "
            f"{score_s * world / 8:.1f}s + {adapt_s * world / 8:.1f}s (linear in ranks; {more})")
    elif args.eval_stride:
        q_loss, q_bpb = evaluate(scorer, val_tokens, eval_seq_len, args.eval_stride, args.eval_batch_seqs, luts, rank, world)
        log(f"round trip: val_loss:{q_loss:.4f} val_bpb:{q_bpb:.4f} (sliding, seq_len {eval_seq_len} stride {args.eval_stride})")
    log(f"evaluation took {sync_time(device) - t_eval:.1f}s")

    if rank == 0:
        hardware = f"{world}x {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"{world}x CPU"
        blurb = args.blurb or (f"{args.num_layers}L {args.model_dim}d MLP{args.mlp_mult:g}x, {args.quant_bits}{' GPTQ' * bool(hessians)} + "
                               f"{'/'.join(sorted({r['codec'] for r in report}))}, {mode} eval; trained {step} steps "
                               f"on {args.data_path} with {hardware}")
        submission = dict(name=args.name or f"run {args.run_id}", author=args.author, github_id=args.github_id,
                          date=datetime.date.today().isoformat(), val_loss=round(q_loss, 8), val_bpb=round(q_bpb, 8),
                          bytes_total=bytes_total, bytes_code=code_bytes, blurb=blurb)
        partial(out_dir / "submission.json").write_text(json.dumps(submission, indent=2) + "\n")
        for name in OUTPUT_NAMES:
            os.replace(partial(out_dir / name), out_dir / name)
    log(f"final_score val_loss:{q_loss:.8f} val_bpb:{q_bpb:.8f} eval:{mode} seq_len:{eval_seq_len} "
        f"stride:{args.eval_stride or eval_seq_len} bytes_total:{bytes_total}")


def run() -> int:
    """What `python3 train_gpt.py` does, as a function the tests can call: main() with SIGINT and SIGTERM
    turned into Stopped, so that a stopped run still ends its log. Returns the exit code: 0; 2 after a
    bad input or setting, reported as one `error:` line; 128 + the signal's number when stopped."""
    handlers = {s: signal.signal(s, raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        main()
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except Stopped as err:
        print(err, file=sys.stderr, flush=True)
        return 128 + err.signum
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(run())
