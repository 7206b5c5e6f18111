"""Experiment configuration: typed dataclasses, YAML files, `section.key=value` overrides.

This module imports no JAX, so a bad config is refused before any accelerator work starts.
Every value is coerced to its field's declared type (`optimizer.lr=1e-3` is a float, where
`yaml.safe_load("1e-3")` is a string); an unknown key is an error naming the closest valid one.

Every choice a user makes by name is a `Literal` type below, declared once: validation reads
the names from the type, and the modules that implement a choice (`kd_jax.losses.divergences`,
`kd_jax.parallel.mesh`, `kd_jax.cache.manifest`) read them from here with `choices()`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

DType = Literal["float32", "bfloat16"]
TeacherDType = Literal["auto", "float32", "bfloat16"]
# none: hard-label training; checkpoint: a `kd-jax train` run directory at `teacher.path`;
# hf: a Hugging Face checkpoint directory at `teacher.path`;
# cache: targets precomputed by `kd-jax precompute` into `cache.dir`
TeacherSource = Literal["none", "checkpoint", "hf", "cache"]
# scratch: random, from model.seed; hf: a Hugging Face checkpoint at model.path; teacher: the
# teacher's layers model.init_layers, optionally pruned (kd_jax.models.surgery)
ModelInit = Literal["scratch", "hf", "teacher"]
# The Hugging Face architectures one model definition covers (kd_jax.models.families).
ModelFamily = Literal["llama", "mistral", "qwen2", "qwen3"]
RopeScaling = Literal["none", "linear", "llama3"]
# cache: the rows of `kd-jax cache import`
DataSource = Literal["stdlib", "text", "json", "parquet", "csv", "hub", "cache"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "mse"]
CrossVocab = Literal["mapped", "uld", "hybrid", "bytes"]  # loss.cross_vocab (kd_jax.losses.cross_vocab)
HiddenKind = Literal["mse", "cosine"]  # loss.hidden_kind (kd_jax.losses.whitebox)
Schedule = Literal["cosine", "constant"]
CacheMode = Literal["topk", "sample", "full"]
ValueDType = Literal["float16", "float32"]
# Named logical-axis -> mesh-axis tables (the tables are in `kd_jax.parallel.mesh`).
MeshLayout = Literal["replicated", "fsdp", "tensor", "fsdp_tensor"]
# How attention is computed (`kd_jax.models.attention`): dense builds every [t, s] score;
# blockwise runs an online softmax over blocks (memory linear in t); cudnn calls
# jax.nn.dot_product_attention's cuDNN kernel (GPU); auto picks by platform and length.
AttentionKind = Literal["auto", "dense", "blockwise", "cudnn"]
# What each layer keeps for the backward pass (`kd_jax.models.transformer`): none keeps every
# activation; full keeps only the layer's input and recomputes the rest; dots keeps the
# projections' and MLP's matmul outputs and recomputes the attention scores and elementwise ops.
RematPolicy = Literal["none", "full", "dots"]
# How the forward pass runs over the layers (`kd_jax.models.transformer`): scan traces one layer
# and loops over the stacked weights (compile time independent of depth); unroll writes every
# layer out (faster steps on a CPU, compile time growing with depth); auto: by platform, depth.
LayerLoop = Literal["auto", "scan", "unroll"]
NonFinitePolicy = Literal["stop", "skip"]
# A weight's fake-quantized format (kd_jax.models.quantize); q8_0, q4_0: llama.cpp's formats.
WeightFormat = Literal["none", "int8", "int4", "q8_0", "q4_0"]
# The embedding's and head's; auto: none, q8_0 for llama.cpp's formats, else int8.
EdgeFormat = Literal["auto", "none", "int8", "int4", "q8_0", "q4_0"]
LLAMA_CPP_FORMATS = ("q8_0", "q4_0")  # blocks of 32
# The projections' inputs: int8, a scale per token from its own max |x| (dynamic range).
ActivationFormat = Literal["none", "int8"]
LoraTarget = Literal["q", "k", "v", "o", "gate", "up", "down"]  # the layers' projections
# Which model `kd-jax generate` runs: the student of train.run_dir, or the teacher at teacher.path.
GenerateModel = Literal["student", "teacher"]


def choices(literal: Any) -> tuple[str, ...]:
    """The names a `Literal` type allows, in declaration order."""
    return typing.get_args(literal)


class ConfigError(ValueError):
    """A user mistake in a config file or override; the CLI prints it on one line, exit code 2."""


@dataclasses.dataclass
class ModelConfig:
    """A decoder-only transformer of the Llama family, and where its weights come from.

    With `init: hf` the architecture (sizes, family flags, rotary settings) is read from the
    checkpoint's config.json; with `init: teacher`, it is the teacher's, narrowed. The student's
    own choices (dtype, param_dtype, remat, attention, init_std, seed) stay as configured.
    """

    init: ModelInit = "scratch"
    path: str = ""  # init hf: a checkpoint directory (config.json, *.safetensors, tokenizer.json)
    init_layers: list[int] = dataclasses.field(default_factory=list)  # teacher layers; []: all
    prune_d_ff: int = 0  # init teacher: MLP width kept, by activation importance; 0: all
    prune_kv_heads: int = 0  # init teacher: key/value heads kept, each with its query heads; 0: all
    prune_batches: int = 4  # init teacher with pruning: batches the importance is measured on

    vocab_size: int = 256  # embedding rows; may exceed the tokenizer's size (extra rows are masked)
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads must be a multiple of n_kv_heads
    head_dim: int = 0  # 0 means d_model // n_heads
    d_ff: int = 512  # SwiGLU hidden width
    max_seq_len: int = 512  # longest context the model accepts (rotary tables are built for it)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # output head shares the embedding matrix, [vocab, d]
    remat: RematPolicy = "none"  # was a boolean: true reads as full, false as none
    layer_loop: LayerLoop = "auto"
    attention: AttentionKind = "auto"
    attention_block: int = 512  # blockwise: tokens per query and key block
    dtype: DType = "float32"  # activations
    param_dtype: DType = "float32"
    init_std: float = 0.02
    seed: int = 0  # parameter initialization
    family: ModelFamily = "llama"  # the config.json layout `kd-jax export` writes
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    o_bias: bool = False  # a bias on the attention output projection (Llama attention_bias)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys, before rotary (Qwen3)
    sliding_window: int = 0  # a token sees itself and the window-1 tokens before it; 0: all
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0  # linear and llama3: how much longer the context is made
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max: int = 8192  # llama3: the context the model was pretrained on
    # Quantization-aware training (kd_jax.models.quantize): the forward pass sees the weights
    # fake-quantized (straight-through gradients, float master weights); a teacher runs in float.
    quantize: WeightFormat = "none"  # the layers' q, k, v, o, gate, up and down projections
    # int8/int4 weights sharing a scale along the contracted dimension; 0: per output channel.
    # q8_0 and q4_0 always have llama.cpp's blocks of 32.
    quantize_group: int = 0
    quantize_embedding: EdgeFormat = "auto"  # the embedding rows; auto: see EdgeFormat
    quantize_head: EdgeFormat = "auto"  # the output head; tied, it must be the embedding's
    quantize_activations: ActivationFormat = "none"  # the inputs of the layers' projections
    # LoRA (kd_jax.models.lora): the base frozen (with quantize, fake-quantized: QLoRA), a pair
    # of adapters per targeted projection trained: W x + (lora_alpha / lora_rank) B A x
    lora_rank: int = 0  # r of A [in, r] and B [r, out]; 0: off, every weight trained
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # on the adapters' input, in training steps only
    # LoraTarget's names; all by default (QLoRA: adapters on every linear layer, not attention's)
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: list(choices(LoraTarget)))

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def weight_format(self, part: str) -> str:
        """The format of the `part` weights (layers, embedding or head), auto made concrete."""
        own = self.quantize if part == "layers" else getattr(self, f"quantize_{part}")
        auto = {"none": "none", "q8_0": "q8_0", "q4_0": "q8_0"}.get(self.quantize, "int8")
        return own if own != "auto" else auto


@dataclasses.dataclass
class TeacherConfig:
    """Where the frozen teacher comes from; named once, here."""

    # With source cache, `path` (if set) names the teacher run the cache came from: it is
    # checked against the cache, and evaluated beside the student.
    source: TeacherSource = "none"
    path: str = ""
    # The frozen teacher's precision (parameters and forward pass). auto: for a Hugging Face
    # checkpoint bfloat16 (what real teachers are published in), except on a CPU without
    # bfloat16 matrix instructions (float32 is faster there); float32 for a kd-jax run. The
    # start-up line says which and why.
    dtype: TeacherDType = "auto"
    # The teacher's terms, recorded in an exported model card: a distilled model's user must be
    # able to show that the teacher's licence allows distillation.
    license: str = ""
    source_url: str = ""


@dataclasses.dataclass
class DataConfig:
    source: DataSource = "stdlib"
    path: str = ""  # data files (comma-separated, globs allowed) or a hub dataset name
    name: str = ""  # hub dataset configuration name
    split: str = "train"
    heldout_split: str = ""  # a split of the source to evaluate on; empty: hold out documents
    heldout_fraction: float = 0.05  # fraction of documents held out when heldout_split is empty
    # Held-out files (comma-separated, globs allowed), read as data.path is (same source kind and
    # columns): the rows evaluated on are exactly theirs, and data.path is trained on whole.
    # Empty: heldout_split (hub) or heldout_fraction.
    heldout_path: str = ""
    text_column: str = "text"
    prompt_column: str = ""  # with response_column: chat-style data, loss on the response only
    response_column: str = ""
    # A column of chat conversations ([{role, content}, ...]) rendered with the tokenizer's own
    # chat template; the loss covers the assistant turns only.
    messages_column: str = ""
    # Read a hub dataset as a stream (nothing downloaded in full first); needs data.store.
    streaming: bool = False
    # A token store: the data tokenized and packed once into memory-mapped files there
    # (`kd-jax prepare`, or the first run that needs it); empty: packed in memory at each start.
    store: str = ""
    store_shard_mb: float = 64.0  # text per token-store shard: the unit of a resumed prepare
    # Several sources drawn from by weight, each a mapping of `weight` and source keys (source,
    # path, name, split, text_column, messages_column, streaming, ...), each prepared into
    # <data.store>/<i>; the source keys above are then unused. Needs data.store.
    mixture: list[dict] = dataclasses.field(default_factory=list)
    # auto: the checkpoint's tokenizer.json (model.path, else an hf teacher's), else byte;
    # byte; or a Hugging Face tokenizer.json (or a directory holding one)
    tokenizer: str = "auto"
    # Start each document with the tokenizer's beginning-of-sequence prefix, as it encodes a text
    # with its special tokens (Llama's <|begin_of_text|>; nothing for bytes, GPT-2 or Qwen).
    add_bos: bool = True
    seq_len: int = 256
    # A teacher with another tokenizer reads each row again in its own tokens, in rows of this
    # many (0: what the first rows take, a tenth more, in multiples of 64, within the teacher's
    # max_seq_len); what does not fit is cut, and the student positions it would have aligned
    # with are trained on their labels alone.
    teacher_seq_len: int = 0
    max_documents: int = 0  # 0 means all
    seed: int = 0  # document split and per-epoch shuffling


@dataclasses.dataclass
class LossConfig:
    divergence: Divergence = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5  # jsd interpolation; 0 is forward KL, 1 is reverse KL (as TRL defines them)
    skew: float = 0.1  # skew_kl / skew_reverse_kl mixing weight (DistiLLM)
    kd_weight: float = 1.0
    ce_weight: float = 0.0  # hard-label cross-entropy at T=1
    # Tokens per chunk of the fused LM-head + loss (kd_jax.losses.chunked): no [tokens, vocab]
    # array for the whole batch. 0: automatic (chunked when the vocabulary is large); -1: never.
    chunk_tokens: int = 0
    # A teacher with another tokenizer (kd_jax.align, kd_jax.losses.cross_vocab): mapped, the
    # divergence over buckets of tokens that start with the same text; uld, the distance between
    # the sorted probabilities (no map); hybrid, the divergence over the tokens both vocabularies
    # spell alike (and one bucket for the rest) plus uld between the rest's probabilities;
    # bytes, the divergence between the next byte's distributions, the teacher's taken back to
    # where its token started (kd_jax.losses.cross_bytes: for students of bytes or characters).
    cross_vocab: CrossVocab = "mapped"
    # White-box terms (kd_jax.losses.whitebox; weight 0: off) between [student, teacher] layers
    hidden_weight: float = 0.0  # projected layer outputs against the teacher's (TinyBERT)
    hidden_kind: HiddenKind = "mse"
    hidden_layers: list[list[int]] = dataclasses.field(default_factory=list)  # []: uniform
    attention_weight: float = 0.0  # KL of attention distributions (MiniLM)
    attention_layers: list[list[int]] = dataclasses.field(default_factory=list)  # []: last


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 3e-3
    schedule: Schedule = "cosine"  # both after a linear warm-up
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm gradient clipping; 0 disables


@dataclasses.dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 100
    batch_size: int = 16  # global batch, in sequences
    microbatches: int = 1  # gradient accumulation; batch_size must be divisible by it
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_sequences: int = 64  # held-out sequences per evaluation
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    stop_at: int = 0  # stop after this step (a job slot's share); the schedule spans `steps`
    # A step whose loss or gradients are not finite is never applied; then stop (naming the step
    # and the term; the last checkpoint is kept), or skip it and count it in the metrics.
    on_nonfinite: NonFinitePolicy = "stop"
    progress: bool = True
    # TensorBoard event files in <run_dir>/tensorboard/: every metrics.jsonl record as scalars
    # (kd_jax.train.tensorboard, written off the training thread)
    tensorboard: bool = False


@dataclasses.dataclass
class MeshConfig:
    """The device mesh ("data", "fsdp", "tensor") and how each model's parameters lie on it. The
    batch is split over data x fsdp; "fsdp" layouts shard the parameters' `embed` dimension over
    fsdp, "tensor" layouts shard heads, MLP width and vocabulary over tensor."""

    data: int = -1  # -1: the devices left over by the other two axes
    fsdp: int = 1
    tensor: int = 1
    student_layout: MeshLayout = "replicated"
    teacher_layout: MeshLayout = "replicated"
    # Per-model changes to the layout's table, logical axis -> mesh axis (or null: not split),
    # e.g. {mlp: tensor, vocab: null}; the logical axes are kd_jax.parallel.mesh.LOGICAL_AXES.
    student_rules: dict = dataclasses.field(default_factory=dict)
    teacher_rules: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CacheConfig:
    """The teacher-logit cache: written by `kd-jax precompute`, read with `teacher.source: cache`.
    topk keeps the k most likely tokens and the mass of the rest; sample keeps `draws` tokens
    drawn from the teacher (an unbiased estimate of the full loss); full keeps every log-prob."""

    dir: str = ""
    mode: CacheMode = "topk"
    k: int = 32  # topk
    draws: int = 12  # sample
    # topk and sample store the teacher at this temperature, and training must use the same
    # loss.temperature; full stores T = 1 and any loss.temperature applies exactly.
    temperature: float = 1.0
    seed: int = 0  # sample: draws are seeded by this and the global row index
    value_dtype: ValueDType = "float16"
    rows_per_shard: int = 256
    batch_size: int = 0  # rows per teacher forward pass in precompute; 0: train.batch_size
    prefetch: int = 2  # batches read ahead while training from a cache


@dataclasses.dataclass
class DistributedConfig:
    """Multi-host runs: one process per host, every process running the same command. With
    `enabled`, `jax.distributed.initialize` runs before anything else touches JAX. Fields left
    empty are detected by JAX where it can (TPU pod slices, SLURM, `JAX_COORDINATOR_ADDRESS`)."""

    enabled: bool = False
    coordinator: str = ""  # host:port of process 0
    num_processes: int = 0  # 0: detected
    process_id: int = -1  # -1: detected
    timeout_s: int = 300  # how long to wait for every process to join


@dataclasses.dataclass
class GenerateConfig:
    """`kd-jax generate`: responses to prompts, a JSON line each (prompt, response,
    prompt_tokens, response_tokens: a dataset for `data.prompt_column: prompt` and
    `data.response_column: response`). Decoding is `kd_jax.models.generate`."""

    # student: the latest checkpoint of train.run_dir; teacher: teacher.path (a kd-jax run or a
    # Hugging Face checkpoint directory, as teacher.source says)
    model: GenerateModel = "student"
    # A .jsonl file of {"prompt": ...} objects (such as this command's output), or a text file of
    # one prompt a line; empty: the prompts of the data section (data.prompt_column of
    # data.source and data.path, split data.split)
    prompts: str = ""
    out: str = ""  # the JSONL file written (whole: a temporary name, renamed when complete)
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy, the most likely token
    top_k: int = 0  # draw from the k most likely tokens only; 0: all
    top_p: float = 1.0  # then from the nucleus of this probability, in (0, 1]; 1: all
    # Tokens that end a response (kept out of it): ids, or strings that are one token each;
    # empty: the tokenizer's end-of-sequence token, if it has one
    stop: list[int | str] = dataclasses.field(default_factory=list)
    batch_size: int = 16  # prompts a pass; divisible by mesh data x fsdp
    seed: int = 0  # a prompt's draws depend on this and its row number only


@dataclasses.dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD, Agarwal et al. 2024): in every step of `kd-jax distill`, a
    fraction of the batch's rows keep only their prompt, the student answers it by sampling
    inside the step, and the online teacher scores the answer; the loss (loss.divergence: GKD
    uses jsd with loss.beta) covers the student's own tokens on those rows, and the rest of the
    batch is trained on as usual (`kd_jax.train.onpolicy`)."""

    fraction: float = 0.0  # lambda: the share of each batch's rows answered by the student
    # A row's prompt: a prompt/response row's untrained prompt, whole; a row trained from its
    # first token (plain text) gives its first prompt_tokens tokens
    prompt_tokens: int = 32
    # Tokens sampled per answer; a prompt keeps at most data.seq_len - max_new_tokens tokens
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy; GKD samples at 1
    top_k: int = 0  # 0: all
    top_p: float = 1.0  # in (0, 1]; 1: all
    # Tokens that end an answer (trained on, as the teacher scores them): ids or one-token
    # strings; empty: the tokenizer's end-of-sequence token, if it has one
    stop: list[int | str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    onpolicy: OnPolicyConfig = dataclasses.field(default_factory=OnPolicyConfig)
    # Several teachers at once (kd_jax.config.teachers): a list of mappings, each a teacher's
    # `source`, `path` and `weight`, and optionally `dtype`, `cache` (its cache.dir), `layout`
    # (its mesh.teacher_layout), `license`, `source_url`. The distillation term is the weighted
    # sum of each teacher's (weights as shares of their sum); `teacher.source` is then none.
    teachers: list[dict] = dataclasses.field(default_factory=list)


# The config's sections: every field of Config but the `teachers` list.
SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "teachers")


def section_types(section_cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


# Below the sections they convert, check and read (they import them from here).
from kd_jax.config.coercion import coerce  # noqa: E402, F401
from kd_jax.config.files import apply_overrides, dump, from_dict, load  # noqa: E402, F401
from kd_jax.config.validation import check as validate  # noqa: E402, F401
