"""The Flower ClientApp: one local training loop for every strategy, state in ``Context.state``.

A client message runs in a reused simulation actor (shared across clients) or in a fresh
deployment process, so nothing about a client may live in module globals. Everything that must
survive between rounds — the layers the strategy keeps local (FedBN's norm layers, the whole
model for local-only), SGD momentum, FRAug's RTNet, prototypes and auxiliary optimizers — is
stored in the client's ``Context.state`` records and restored at the start of each message. On
checkpoint rounds the whole state also goes to the server (:func:`pack_state`), which sends it
back once after a resume (:func:`restore_state`): a resumed run equals an uninterrupted one. A
round whose training went NaN or Inf is not kept (:func:`non_finite_records`): the client starts
its next round from the state it had before it.

Caches, all per process and bounded, none holding client state: :func:`client_data` and
:func:`_parse_config` are ``lru_cache`` wrappers of *pure* functions (the same arguments always give
equal, immutable results), and the model skeleton a message starts from comes from
:mod:`client.cache`, which hands it back exactly as freshly built before anything of the client's
is loaded into it — so none of them can leak state between clients or runs.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.cache import fresh_model
from core.norm import is_norm_key
from core.fl_config import (
    CLIENT_STATE_RECORD,
    DEPLOY_NORM_RECORD,
    EVAL_METRICS,
    EVALUATE_RECEIVED_KEY,
    EVALUATED_PREFIX,
    FRAUG_METRIC_PREFIX,
    GENERATOR_PREFIX,
    GLOBAL_ROUND_KEY,
    PARTITION_KEY,
    SEND_STATE_KEY,
    TRAIN_METRICS,
    WEIGHT_KEY,
    FLConfig,
    build_model,
    has_non_finite,
    local_key_filter,
)

log = logging.getLogger(__name__)

# Context.state record names
STATE_LOCAL = "local-model"
STATE_OPT = "opt-model"
STATE_RTNET = "fraug-rtnet"
STATE_PROTOS = "fraug-prototypes"
STATE_OPT_G = "opt-generator"
STATE_OPT_T = "opt-rtnet"
STATE_META = "meta"


@functools.lru_cache(maxsize=4)
def client_data(cfg: FLConfig) -> Any:
    """The run's dataset, :meth:`FLConfig.make_data` (pure in the config, so caching it per
    process is safe)."""
    return cfg.make_data()


def _dataset(cfg: FLConfig) -> Any:
    return client_data(cfg)


def _arrays_to_numpy(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    return {} if record is None else {k: v.numpy() for k, v in record.items()}


def _numpy_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _partition_id(context: Context, cfg: FLConfig) -> int:
    if PARTITION_KEY not in context.node_config:
        raise ValueError(f"node config lacks {PARTITION_KEY!r} (start the SuperNode with --node-config)")
    pid = int(context.node_config[PARTITION_KEY])
    cfg.client_domain(pid)  # range check with a clear message
    return pid


def _load_state_dict(model: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Write named arrays into the model; unknown names are an error, missing ones keep their value."""
    import torch

    own = model.state_dict()
    unknown = sorted(set(arrays) - set(own))
    if unknown:
        raise ValueError(f"received arrays the model does not have: {unknown[:6]}")
    model.load_state_dict({k: torch.from_numpy(np.array(v)).to(own[k].dtype) for k, v in arrays.items()},
                          strict=False)


def _assemble_model(cfg: FLConfig, context: Context, received: Mapping[str, np.ndarray]) -> tuple[Any, set[str]]:
    """Fresh init → the client's local layers from Context.state → this round's global arrays.

    The fresh init is this worker's cached skeleton reset to exactly ``build_model(cfg)``'s state
    (:func:`client.cache.fresh_model`), not a rebuild per message.
    """
    model = fresh_model(cfg, lambda: build_model(cfg))
    local_keys = local_key_filter(model, cfg)
    stored = _arrays_to_numpy(context.state.array_records.get(STATE_LOCAL))
    _load_state_dict(model, stored)
    stray = sorted(local_keys & set(received))
    if stray:
        raise ValueError(f"server sent layers this strategy keeps local: {stray[:6]}")
    _load_state_dict(model, received)
    return model, local_keys


def _split_received(msg: Message) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(model arrays, generator arrays) of an incoming message."""
    arrays = _arrays_to_numpy(msg.content.array_records.get("arrays"))
    model = {k: v for k, v in arrays.items() if not k.startswith(GENERATOR_PREFIX)}
    gen = {k[len(GENERATOR_PREFIX):]: v for k, v in arrays.items() if k.startswith(GENERATOR_PREFIX)}
    return model, gen


def pack_state(state: RecordDict) -> ArrayRecord:
    """The client's whole ``Context.state`` as one ArrayRecord (``<record>/<key>`` names; the
    meta counters as one-element int64 arrays), so the server can checkpoint it without knowing its parts."""
    arrays = {f"{name}/{key}": array for name, record in state.array_records.items()
              for key, array in record.items()}
    for name, record in state.config_records.items():
        arrays.update({f"{name}/{key}": Array(np.asarray([int(value)], np.int64)) for key, value in record.items()})
    return ArrayRecord(array_dict=arrays)


def restore_state(context: Context, packed: ArrayRecord) -> None:
    """Put a checkpointed state (from :func:`pack_state`) back into a fresh ``Context.state``.

    A context that has trained already is refused: two states for one client would be a bug."""
    if STATE_META in context.state.config_records:
        raise ValueError("the server sent a checkpointed state to a client that already holds one")
    groups: dict[str, dict[str, Array]] = {}
    for name, array in packed.items():
        record, sep, key = name.partition("/")
        if not sep:
            raise ValueError(f"client state entry {name!r} is not <record>/<key>")
        groups.setdefault(record, {})[key] = array
    for record, arrays in groups.items():
        if record == STATE_META:
            context.state[record] = ConfigRecord({k: int(v.numpy().reshape(-1)[0]) for k, v in arrays.items()})
        else:
            context.state[record] = ArrayRecord(array_dict=arrays)


def non_finite_records(records: Mapping[str, ArrayRecord]) -> list[str]:
    """The names of the records holding a NaN or Inf float array. A client whose round went
    non-finite must not keep that state: its norm layers, momentum or RTNet would stay NaN in every
    later round (the global model it receives cannot repair them), so it would be refused forever."""
    return [name for name, record in records.items()
            if any(has_non_finite(a) for a in _arrays_to_numpy(record).values())]


def _global_round(msg: Message) -> int:
    config = msg.content.config_records.get("config")
    if config is None:
        return 1
    return int(config.get(GLOBAL_ROUND_KEY, config.get("server-round", 1)))


def _fraug_hook(cfg: FLConfig, context: Context, model: Any, gen_arrays: Mapping[str, np.ndarray],
                rnd: int, pid: int) -> Any:
    """Build this round's FRAug hook: received G, stored RTNet / prototypes / optimizer states."""
    import torch

    from core.fraug import FRAugHook, RTNet, make_generator

    settings = cfg.fraug  # the generator's and RTNet's optimizers take only their own settings, never the
    # model's: inherited, a model momentum of 0.9 made their step 5x the authors' (issue 11)
    d, c = model.embedding_dim, model.num_classes
    generator = make_generator(cfg.seed, d, c, cfg.fraug_latent_dim)
    if not gen_arrays:
        raise ValueError("FRAug: the server sent no generator")
    _load_state_dict(generator, gen_arrays)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1000 + pid + 2)
        rtnet = RTNet(d, c, cfg.fraug_latent_dim, final_bn=cfg.fraug_rtnet_final_bn)
    _load_state_dict(rtnet, _arrays_to_numpy(context.state.array_records.get(STATE_RTNET)))
    protos_np = _arrays_to_numpy(context.state.array_records.get(STATE_PROTOS)).get("mu")
    protos = torch.zeros(c, d) if protos_np is None else torch.from_numpy(protos_np.copy())
    states = {"generator": _arrays_to_numpy(context.state.array_records.get(STATE_OPT_G)),
              "rtnet": _arrays_to_numpy(context.state.array_records.get(STATE_OPT_T))}
    return FRAugHook(settings, generator, rtnet, protos, server_round=rnd, total_rounds=cfg.rounds,
                     seed=(cfg.seed * 1_000_003 + pid) * 10_007 + rnd, optimizer_states=states)


def handle_train(msg: Message, context: Context, cfg: FLConfig) -> Message:
    """One round of local training; returns the shared arrays and the client's metrics."""
    import torch

    from core.training import train_local

    torch.set_num_threads(cfg.threads)
    pid = _partition_id(context, cfg)
    split = _dataset(cfg).clients[pid].train
    if CLIENT_STATE_RECORD in msg.content.array_records:  # the first round after a resume
        restore_state(context, msg.content.array_records[CLIENT_STATE_RECORD])
    received, gen_arrays = _split_received(msg)
    rnd = _global_round(msg)
    model, local_keys = _assemble_model(cfg, context, received)
    config = msg.content.config_records.get("config") or {}
    mu = float(config.get("proximal-mu", 0.0))
    spec = cfg.local_spec(proximal_mu=mu)
    global_params = ({n: p.detach().clone() for n, p in model.named_parameters() if n in received}
                     if mu > 0 else None)
    hook = _fraug_hook(cfg, context, model, gen_arrays, rnd, pid) if cfg.strategy == "fraug" else None
    opt_in = _arrays_to_numpy(context.state.array_records.get(STATE_OPT)) if cfg.keep_momentum else None
    result = train_local(model, split, spec, rng=np.random.default_rng([cfg.seed, pid, rnd]),
                         global_params=global_params, hook=hook, optimizer_state_in=opt_in)

    state = model.state_dict()
    new_state: dict[str, ArrayRecord] = {STATE_LOCAL: ArrayRecord(torch_state_dict={k: state[k] for k in local_keys})}
    if cfg.keep_momentum:
        new_state[STATE_OPT] = _numpy_record(result.optimizer_state)
    reply_arrays: dict[str, Any] = {k: v for k, v in state.items() if k not in local_keys}
    metrics: dict[str, float | int] = {
        WEIGHT_KEY: result.num_examples, PARTITION_KEY: pid, TRAIN_METRICS["train_loss"]: result.loss,
        TRAIN_METRICS["train_accuracy"]: result.accuracy, "steps": result.steps,
    }
    if hook is not None:
        opt_states = hook.optimizer_states()
        new_state.update({STATE_RTNET: ArrayRecord(torch_state_dict=hook.T.state_dict()),
                          STATE_PROTOS: _numpy_record({"mu": hook.protos.numpy()}),
                          STATE_OPT_G: _numpy_record(opt_states["generator"]),
                          STATE_OPT_T: _numpy_record(opt_states["rtnet"])})
        reply_arrays.update({GENERATOR_PREFIX + k: v for k, v in hook.G.state_dict().items()})
        metrics.update({FRAUG_METRIC_PREFIX + k: float(v) for k, v in result.metrics.items()})
    broken = non_finite_records(new_state)
    if broken:  # the reply still goes out (the server refuses non-finite shared arrays); the state is not kept
        log.warning("client %d round %d: local training went non-finite (%s); its local state stays as it was "
                    "before this round", pid, rnd, ", ".join(broken))
    else:
        for name, record in new_state.items():
            context.state[name] = record
        rounds_trained = int(context.state.config_records[STATE_META]["rounds-trained"]) + 1 \
            if STATE_META in context.state.config_records else 1
        context.state[STATE_META] = ConfigRecord({"rounds-trained": rounds_trained, "last-round": rnd})
    log.debug("client %d round %d: loss %.4f acc %.3f (%d steps)", pid, rnd, result.loss, result.accuracy,
              result.steps)
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=reply_arrays), "metrics": MetricRecord(metrics)})
    local_norm = {k: state[k] for k in local_keys if is_norm_key(model, k)}
    if local_norm:  # for the deployed model's normalization (FedBN / FRAug keep these local)
        content[DEPLOY_NORM_RECORD] = ArrayRecord(torch_state_dict=local_norm)
    if bool(config.get(SEND_STATE_KEY, False)):  # a checkpoint round
        content[CLIENT_STATE_RECORD] = pack_state(context.state)
    return Message(content=content, reply_to=msg)


def handle_query(msg: Message, context: Context, cfg: FLConfig) -> Message:
    """Which partition this node serves: a resumed server maps its checkpointed client states
    onto the new run's node ids with it."""
    return Message(content=RecordDict({"metrics": MetricRecord({PARTITION_KEY: _partition_id(context, cfg)})}),
                   reply_to=msg)


def evaluation_metrics(msg: Message, context: Context, cfg: FLConfig) -> dict[str, float | int]:
    """The client's model (global arrays + its local layers) on its own validation and test splits."""
    import torch

    from core.training import evaluate

    torch.set_num_threads(cfg.threads)
    pid = _partition_id(context, cfg)
    data = _dataset(cfg).clients[pid]
    received, _ = _split_received(msg)
    model, _ = _assemble_model(cfg, context, received)
    test_loss, test_acc = evaluate(model, data.test)
    val_loss, val_acc = evaluate(model, data.val)
    values = {"test_loss": test_loss, "test_accuracy": test_acc, "val_loss": val_loss, "val_accuracy": val_acc}
    return {WEIGHT_KEY: len(data.test), PARTITION_KEY: pid, **{EVAL_METRICS[k]: v for k, v in values.items()}}


def handle_evaluate(msg: Message, context: Context, cfg: FLConfig) -> Message:
    """An evaluate message: :func:`evaluation_metrics` as the reply."""
    return Message(content=RecordDict({"metrics": MetricRecord(evaluation_metrics(msg, context, cfg))}),
                   reply_to=msg)


def handle_train_evaluating_received(msg: Message, context: Context, cfg: FLConfig) -> Message:
    """:func:`handle_train`, first evaluating the received model when the server asks for it
    (``EVALUATE_RECEIVED_KEY``: the previous round's evaluation, folded into this message).

    The evaluation runs before training, so it sees the local layers as the previous round left
    them — the same model a separate evaluate message would have assembled; it changes nothing in
    ``Context.state`` and draws no random numbers, so training is unaffected.
    """
    config = msg.content.config_records.get("config")
    evaluated = evaluation_metrics(msg, context, cfg) \
        if config is not None and config.get(EVALUATE_RECEIVED_KEY, False) else {}
    reply = handle_train(msg, context, cfg)
    if evaluated:
        metrics = reply.content.metric_records["metrics"]
        for key, value in evaluated.items():
            metrics[EVALUATED_PREFIX + key] = value
    return reply


@functools.lru_cache(maxsize=8)
def _parse_config(items: tuple[tuple[str, Any], ...]) -> FLConfig:
    """The run config parsed once per process, not per message (pure; FLConfig is frozen)."""
    return FLConfig.from_run_config(dict(items))


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose config is the run config with ``overrides`` on top.

    ``fedshift fl`` passes its flags as overrides (the deprecated in-process ``run_simulation``
    gives apps an empty run config); ``flwr run`` uses the module-level :data:`app` (no overrides).
    """
    fixed = dict(overrides or {})
    client_app = ClientApp()

    def config_of(context: Context) -> FLConfig:
        return _parse_config(tuple(sorted({**context.run_config, **fixed}.items())))

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train_evaluating_received(msg, context, config_of(context))

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, config_of(context))

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, config_of(context))

    return client_app


app = make_client_app()
