"""The run builder: config -> everything a run needs, checked before anything is written.

`kd-jax train`, `distill`, `eval` and `precompute` all start with `build(cfg, mode)`: the
tokenizer and the packed rows, the device mesh and where every array lies on it, the teacher (a
loaded teacher run, and the teacher the step sees: online, from a cache, or none), the student
(abstract: shapes and shardings), the optimizer, and the placed batch of any step. Every user
mistake surfaces here as a `ConfigError`, before the run directory is touched; what is built
is then used by `kd_jax.train.loop` (train, distill, eval) and `kd_jax.train.precompute`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from kd_jax import checkpoint
from kd_jax.cache.fingerprints import teacher_fingerprint
from kd_jax.config import Config, ConfigError
from kd_jax.config.teachers import members
from kd_jax.data.batches import Batches
from kd_jax.data.tokenizers import Tokenizer, stop_token_ids
from kd_jax.losses.whitebox import WhiteBox
from kd_jax.models import lora, surgery
from kd_jax.models.pretrained import check_params, load_params, open_checkpoint
from kd_jax.models.pure import PureModel, abstract_model, count_params, init_params, logical_axes
from kd_jax.parallel import mesh as mesh_lib
from kd_jax.parallel.hosts import (
    BatchPlacement,
    barrier,
    initialize_distributed,
    is_main_process,
)
from kd_jax.run_dir import check_resume
from kd_jax.teacher.cached import CachedTeacher, open_cache
from kd_jax.teacher.cross import CrossTokenizerTeacher, cross_tokenizer_teacher
from kd_jax.teacher.loading import (
    LoadedTeacher,
    check_same_tokenizer,
    load_teacher,
    teacher_dtype_choice,
)
from kd_jax.teacher.online import OnlineTeacher
from kd_jax.teacher.several import SeveralTeachers
from kd_jax.train import step as step_lib
from kd_jax.train.onpolicy import OnPolicy, answered_rows
from kd_jax.train.resolve import resolve
from kd_jax.train.run_data import RunData, load_data

MODES = ("train", "distill", "eval", "precompute")


@dataclasses.dataclass
class Run:
    cfg: Config
    mode: str
    data: RunData
    mesh: Any
    placement: BatchPlacement  # where a step's global batch lies (precompute: a teacher pass)
    eval_placement: BatchPlacement | None  # where an evaluation batch lies: one microbatch
    # Each teacher the config names, loaded (None: a cache of no named teacher run): evaluated
    # beside the student, and online, the step's; one per entry of `teachers:`.
    loaded_teachers: list[LoadedTeacher | None]
    # what the step distills from (None: labels)
    teacher: OnlineTeacher | CrossTokenizerTeacher | CachedTeacher | SeveralTeachers | None
    student: PureModel | None = None
    abstract_params: Any = None
    param_shardings: Any = None
    logits_sharding: Any = None  # the student's [batch, tokens, vocab] logits
    tx: Any = None
    schedule: Any = None
    abstract_state: Any = None
    state_shardings: Any = None
    batches: Batches | None = None  # which packed rows make each step's batch
    whitebox: WhiteBox | None = None  # white-box terms (distill from an online teacher)
    onpolicy: OnPolicy | None = None  # rows the student answers (distill, online teacher)
    teacher_dtype_why: str = ""  # why the teacher runs in cfg.teacher.dtype (the start-up line)

    @property
    def loaded_teacher(self) -> LoadedTeacher | None:
        """The (first) teacher loaded: a lone teacher's, what most commands need."""
        return self.loaded_teachers[0] if self.loaded_teachers else None

    @property
    def valid_vocab(self) -> int:
        return self.data.tokenizer.vocab_size

    @property
    def teacher_params(self) -> Any:
        """The teacher parameters the step takes: None unless it runs the teacher online; for
        several teachers a tuple, one entry each (None for a cache)."""
        def params(teacher, loaded):
            online = isinstance(teacher, (OnlineTeacher, CrossTokenizerTeacher))
            return loaded.params if online else None
        if isinstance(self.teacher, SeveralTeachers):
            return tuple(params(teacher, loaded) for teacher, loaded in
                         zip(self.teacher.members, self.loaded_teachers))
        return params(self.teacher, self.loaded_teacher)

    def info(self) -> dict[str, Any]:
        """run.json: what later commands need to know about this run."""
        teacher = self.loaded_teacher
        return {
            "mode": self.mode,
            "tokenizer": self.cfg.data.tokenizer,
            "tokenizer_fingerprint": self.data.tokenizer.fingerprint,
            "tokenizer_vocab_size": self.data.tokenizer.vocab_size,
            "data_fingerprint": self.data.fingerprint,
            "student_params": count_params(self.abstract_params),
            "teacher_params": count_params(teacher.params) if teacher is not None else None,
            "teacher_files": teacher.files if teacher is not None else None,
            # Several teachers: each one's, in the order of `teachers:`.
            "teachers": [{"path": loaded.run_dir, "params": count_params(loaded.params),
                          "files": loaded.files} if loaded is not None else None
                         for loaded in self.loaded_teachers] if self.cfg.teachers else None,
        }

    def host_batch(self, step: int) -> dict[str, Any]:
        """This process's rows of step `step`'s batch, and what the teacher reads beside them."""
        rows = self.batches.rows(step, self.placement.positions)
        batch = self.batches.take(rows)
        if self.teacher is not None:
            batch.update(self.teacher.host_fields(rows, batch))
        return batch

    def update_fn(self):
        """The jitted step: `update(state, teacher_params, batch) -> (state, metrics)`."""
        update = step_lib.make_update(
            self.student, self.teacher, self.tx, self.schedule, self.cfg.loss,
            self.cfg.train.microbatches, self.valid_vocab, self.logits_sharding, self.whitebox,
            self.onpolicy)
        teacher_params = self.teacher_params
        # The state is donated: its buffers are reused for the next state (no second copy).
        return jax.jit(update, donate_argnums=(0,), in_shardings=(
            self.state_shardings,
            jax.tree.map(lambda p: p.sharding, teacher_params),
            self.placement.sharding),
            out_shardings=(self.state_shardings, mesh_lib.replicated(self.mesh)))

    def init_aux(self) -> Any:
        """The white-box terms' projections at step 0 ({} without)."""
        return self.whitebox.init_aux() if self.whitebox is not None else {}

    def fresh_state(self) -> step_lib.TrainState:
        """The state of step 0: the student initialized as `model.init` says."""
        model_cfg = self.cfg.model
        if model_cfg.init == "scratch":
            return step_lib.init_state_on(model_cfg, self.tx, self.cfg.train.seed,
                                          self.state_shardings, self.init_aux)
        if model_cfg.init == "hf":
            params = load_params(open_checkpoint(model_cfg.path), model_cfg,
                                 lora.base_of(self.abstract_params),
                                 lora.base_of(self.param_shardings))
        else:
            params = self._params_from_teacher()
        if model_cfg.lora_rank:  # the adapters as `init_params` draws them (B zero)
            params[lora.ADAPTERS] = jax.jit(
                lambda: init_params(model_cfg)[lora.ADAPTERS],
                out_shardings=self.param_shardings[lora.ADAPTERS])()
        dtypes = jax.tree.map(lambda leaf: leaf.dtype, self.abstract_params)
        return jax.jit(
            lambda params: step_lib.init_state(
                jax.tree.map(lambda p, dtype: p.astype(dtype), params, dtypes), self.tx,
                self.cfg.train.seed, self.init_aux()),
            out_shardings=self.state_shardings)(params)

    def _params_from_teacher(self) -> Any:
        """The teacher's layers `model.init_layers`, pruned by importance on a few batches."""
        model_cfg, teacher = self.cfg.model, self.loaded_teacher
        heads = mlp = None
        if model_cfg.prune_d_ff or model_cfg.prune_kv_heads:
            batches = (self.placement.place(self.batches.take(
                self.batches.rows(step, self.placement.positions)))
                for step in range(model_cfg.prune_batches))
            heads, mlp = surgery.importance(teacher.model, teacher.params, batches)
        # A LoRA teacher's own adapters, merged: its layers as its forward pass computes them.
        return surgery.init_from_teacher(
            lora.merged(teacher.params, teacher.config),
            dataclasses.replace(teacher.config, lora_rank=0), model_cfg, heads, mlp)

    def close(self) -> None:
        if isinstance(self.teacher, (CachedTeacher, SeveralTeachers)):
            self.teacher.close()


def build(cfg: Config, mode: str) -> Run:
    """Everything `mode` needs from `cfg`, checked; nothing is written."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    _check_mode(cfg, mode)
    teacher_dtype_why = teacher_dtype_choice(cfg)[1]
    if cfg.teachers:  # each teacher's, on the start-up line
        teacher_dtype_why = "; ".join(
            f"teachers[{i}] {': '.join(teacher_dtype_choice(member))}"
            for i, (_, member) in enumerate(members(cfg)))
    if mode != "eval":  # evaluation reads a run directory's config, resolved already
        cfg = resolve(cfg)
    if mode in ("train", "distill"):
        check_resume(cfg, checkpoint.latest_step(cfg.train.run_dir) is not None)
    data = load_data(cfg)
    if cfg.model.init == "hf" and mode in ("train", "distill"):
        check_same_tokenizer(Path(cfg.model.path), "model.path", data.tokenizer)
        check_params(open_checkpoint(cfg.model.path), cfg.model,
                     lora.base_of(abstract_model(cfg.model)[1]))
    initialize_distributed(cfg.distributed)  # before anything else touches JAX's devices

    # Where every array lies: the student's state and each teacher's parameters by their own
    # rules, the batch split over data x fsdp. One device gives a mesh of one.
    student_rules = mesh_lib.rules_for(cfg.mesh.student_layout, cfg.mesh.student_rules,
                                       "mesh.student_rules")
    mesh = mesh_lib.make_mesh(cfg.mesh)
    if mode == "precompute":
        placement = BatchPlacement.on(mesh, cfg.cache.batch_size or cfg.train.batch_size,
                                      "cache.batch_size")
        eval_placement = None
    else:
        placement = BatchPlacement.on(mesh, cfg.train.batch_size)
        eval_placement = BatchPlacement.on(mesh, cfg.train.batch_size // cfg.train.microbatches,
                                           "train.batch_size / train.microbatches")

    # A teacher named in a `train` config is not trained against; evaluations compare with it.
    if cfg.teachers:
        shares, built = zip(*[(share, _teacher_of(member, mode, data, mesh))
                              for share, member in members(cfg)])
        loaded_teachers = [loaded for loaded, _ in built]
        teacher = (SeveralTeachers(tuple(teacher for _, teacher in built), shares)
                   if mode == "distill" else None)
    else:
        loaded, teacher = _teacher_of(cfg, mode, data, mesh)
        loaded_teachers = [loaded]
    run = Run(cfg, mode, data, mesh, placement, eval_placement, loaded_teachers, teacher,
              teacher_dtype_why=teacher_dtype_why)
    loaded = run.loaded_teacher
    if mode == "precompute":
        vocab = (loaded.tokenizer or data.tokenizer).vocab_size  # the teacher's tokenizer's
        if loaded.config.vocab_size < vocab:
            raise ConfigError(f"the teacher's vocabulary ({loaded.config.vocab_size}) is smaller "
                              f"than the tokenizer's ({vocab})")
        return run

    run.student, run.abstract_params = abstract_model(cfg.model)
    run.param_shardings = mesh_lib.param_shardings(
        logical_axes(run.student.template), student_rules, mesh, run.abstract_params)
    run.logits_sharding = mesh_lib.logits_sharding(mesh, student_rules, cfg.model.vocab_size)
    if mode == "eval":
        return run
    if isinstance(teacher, OnlineTeacher):
        run.whitebox = WhiteBox.of(cfg.loss, cfg.model, loaded.config, cfg.model.seed)
        run.onpolicy = _onpolicy(cfg, mesh, student_rules, data.tokenizer)
    run.tx, run.schedule = step_lib.make_optimizer(cfg.optimizer, cfg.train.steps)
    # The projections, unknown to the student's table, are replicated (tree_shardings).
    run.abstract_state = jax.eval_shape(
        lambda params: step_lib.init_state(params, run.tx, cfg.train.seed, run.init_aux()),
        run.abstract_params)
    run.state_shardings = mesh_lib.tree_shardings(
        run.abstract_state, run.abstract_params, run.param_shardings, mesh)
    run.batches = Batches(data.train, cfg.train.batch_size, cfg.train.seed)
    return run


def _teacher_of(cfg: Config, mode: str, data: RunData, mesh: Any
                ) -> tuple[LoadedTeacher | None, Any]:
    """The teacher `cfg.teacher` names, loaded (or None), and the teacher the step of `mode`
    distills from: online, online with another tokenizer, from a cache, or None."""
    rules = mesh_lib.rules_for(cfg.mesh.teacher_layout, cfg.mesh.teacher_rules,
                               "mesh.teacher_rules")
    # From a cache, the step needs no teacher; one named by teacher.path is evaluated beside.
    loaded = None
    if cfg.teacher.source in ("checkpoint", "hf") or (
            cfg.teacher.source == "cache" and cfg.teacher.path):
        # The files a run recorded are compared (a cache records its teacher itself).
        # Another tokenizer: its rows are made from the student's (online, or in precompute
        # for a cache of its targets at the student's positions); left out of evaluations.
        loaded = load_teacher(cfg, data.tokenizer, mesh,
                              cfg.train.run_dir if mode != "precompute" else None, True)
        if loaded.tokenizer is not None and cfg.model.init == "teacher":
            raise ConfigError(f"model.init teacher copies the teacher's embeddings, which are "
                              f"for its tokenizer ({loaded.tokenizer.description}), not the "
                              f"student's ({data.tokenizer.description})")
    if mode != "distill":
        return loaded, None
    if cfg.teacher.source in ("checkpoint", "hf"):
        logits_sharding = mesh_lib.logits_sharding(mesh, rules, loaded.config.vocab_size)
        if loaded.tokenizer:
            return loaded, cross_tokenizer_teacher(cfg, data.tokenizer, data.train, loaded,
                                                   logits_sharding)
        return loaded, OnlineTeacher(loaded.model, logits_sharding)
    fingerprint = (teacher_fingerprint(loaded.run_dir, loaded.step)
                   if loaded is not None else None)
    teacher_tokenizer = (loaded.tokenizer or data.tokenizer) if loaded is not None else None
    return loaded, open_cache(cfg, data.tokenizer, data.train, fingerprint, teacher_tokenizer)


def _check_mode(cfg: Config, mode: str) -> None:
    if mode == "distill" and cfg.teacher.source == "none" and not cfg.teachers:
        raise ConfigError("kd-jax distill needs teacher.source: checkpoint or hf (with "
                          "teacher.path), or cache (with cache.dir), or a teachers: list")
    if mode == "precompute" and cfg.teachers:
        raise ConfigError("kd-jax precompute writes one teacher's cache: name that teacher in "
                          "teacher: (and cache.dir), once per teacher of teachers:")
    if mode == "precompute" and cfg.teacher.source not in ("checkpoint", "hf"):
        raise ConfigError("kd-jax precompute needs teacher.source checkpoint or hf, and "
                          f"teacher.path (got teacher.source={cfg.teacher.source})")
    if cfg.onpolicy.fraction > 0 and mode == "train":
        raise ConfigError("onpolicy.fraction applies to kd-jax distill (the student answers, "
                          "the teacher scores), not to kd-jax train")
    if mode == "precompute" and not cfg.cache.dir:
        raise ConfigError("kd-jax precompute needs cache.dir, where the cache is written")


def _onpolicy(cfg: Config, mesh: Any, rules: dict, tokenizer: Tokenizer) -> OnPolicy | None:
    """The step's on-policy part: its sampler placed like the training batch where the
    answered rows split evenly over data x fsdp (otherwise left to XLA)."""
    o = cfg.onpolicy
    if o.fraction == 0:
        return None
    stop_ids = stop_token_ids(o.stop, tokenizer, "onpolicy.stop")
    rows = len(answered_rows(cfg.train.batch_size, o.fraction))
    placed = {}
    if mesh.size > 1 and rows % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0:
        placed = {"cache_sharding": mesh_lib.kv_cache_sharding(mesh, rules,
                                                               cfg.model.n_kv_heads),
                  "activation_sharding": mesh_lib.batch_sharding(mesh)}
    return OnPolicy.of(o, cfg.model, cfg.train.batch_size, cfg.data.seq_len,
                       tokenizer.vocab_size, stop_ids, **placed)


def restore_or_init(run: Run, checkpointer: checkpoint.Checkpointer, log=print
                    ) -> tuple[step_lib.TrainState, int]:
    """The state to start from: the latest sound checkpoint of the run directory, or a fresh one.

    A damaged checkpoint (its arrays do not match their digests) is named, moved to
    `damaged_checkpoints/`, and the one before it is used; none sound left is an error.
    """
    steps = checkpointer.all_steps()
    if not steps:
        state = run.fresh_state()
        if run.cfg.model.lora_rank:  # its frozen base, once; checkpoints hold the adapters
            checkpoint.save_base(run.cfg.train.run_dir, state.params)
        return state, 0
    damaged = []
    for start in reversed(steps):
        try:
            state, meta = checkpointer.restore(start, run.abstract_state, run.state_shardings)
        except checkpoint.DamagedCheckpoint as err:
            damaged.append(start)
            log(f"{err}; {'trying the one before' if start != steps[0] else 'none before it'}")
            continue
        break
    else:
        raise checkpoint.DamagedCheckpoint(
            f"every checkpoint in {run.cfg.train.run_dir} is damaged (steps "
            f"{', '.join(map(str, steps))}); nothing sound to resume from")
    if damaged:
        if is_main_process():
            for step in damaged:
                checkpointer.set_aside(step)
        barrier("damaged checkpoints set aside")
        checkpointer.reload()
        log(f"resuming from checkpoint {start} instead; damaged checkpoint(s) "
            f"{', '.join(map(str, damaged))} moved to damaged_checkpoints/")
    if meta["data_position"] != run.batches.position(start):
        raise ConfigError(f"checkpoint {start} in {run.cfg.train.run_dir} is at data position "
                          f"{meta['data_position']}, expected {run.batches.position(start)}")
    return state, start


def restore_params(run: Run, run_dir: str | Path, step: int) -> Any:
    """A run's student parameters at checkpoint `step`, placed as `run.param_shardings`."""
    return checkpoint.restore_params(
        run_dir, checkpoint.placed(run.abstract_params, run.param_shardings), step)


def eval_place(run: Run):
    """Turns a whole host evaluation batch into this process's share, placed on the mesh."""
    return lambda batch: run.eval_placement.place(run.eval_placement.share(batch))
