"""The schema of a federated run: one pydantic model, loaded from YAML.

A run is four choices (see DESIGN.md): the *task* (``model`` + ``adapter`` + ``data``), the
*federation* (``federation``), the *algorithm* (``algorithm``) and the *runtime* (``runtime``),
plus ``eval``, ``tracking`` and ``seed``. Every section forbids unknown keys, so a typo is an
error that names the field path, the bad value and what is allowed -- before any work starts.

``load_config(path, overrides=["algorithm.local.lr=1e-3"])`` is the one entry point.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A run configuration is invalid. The message names the field path and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------- task


TaskKind = Literal["causal_lm", "classification", "seq2seq"]


class ModelConfig(_Section):
    """Which foundation model: a preset (``tiny-llama``, ``tiny-gpt2``, ``tiny-bert``,
    ``tiny-t5``, ``minilm``), a Hugging Face hub id, or a local directory (``model.name``, or
    its synonym ``model.path``)."""

    name: str = Field(min_length=1)
    task: TaskKind | None = None  # None: the preset's task, else causal_lm
    num_labels: int | None = Field(default=None, ge=2)
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    max_length: int = Field(default=256, ge=8, le=131072)
    # Classifiers of the BERT family: native reads the architecture's pooler (dense + tanh on
    # [CLS]); mean reads the masked mean of the token states (what sentence-transformers
    # checkpoints are trained for); auto: mean when the checkpoint directory declares it.
    pooling: Literal["native", "mean", "auto"] = "native"
    # Extra keys for a preset's model config (e.g. hidden_size) -- presets only.
    config_overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _path_means_name(cls, raw: Any) -> Any:
        """``model.path`` is accepted as another spelling of ``model.name``."""
        if not isinstance(raw, dict) or "path" not in raw:
            return raw
        raw = dict(raw)
        path = raw.pop("path")
        if "name" in raw and raw["name"] != path:
            raise ValueError(f"model.name ({raw['name']!r}) and model.path ({path!r}) disagree; "
                             f"set one of them")
        raw["name"] = path
        return raw


AdapterKind = Literal[
    "lora", "ia3", "prompt_tuning", "prefix_tuning",
    "bitfit", "layernorm", "last_layers", "head", "full", "visual_prompt",
]


class AdapterConfig(_Section):
    """The PEFT family. Reparameterization: lora; additive: ia3, prompt_tuning, prefix_tuning;
    selective: bitfit, layernorm, last_layers, head; and full fine-tuning as the baseline."""

    kind: AdapterKind = "lora"
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None  # None: the model family's default
    num_virtual_tokens: int = Field(default=16, ge=1)
    num_layers: int = Field(default=1, ge=1)  # last_layers: how many final blocks train
    # Classification: also train (and communicate) the classifier head with the adapter.
    train_head: bool = True


DataFormat = Literal["instruction", "chat", "classification", "preference", "image", "audio"]


class InstructionFields(_Section):
    """Column names for the instruction format (Alpaca and Dolly names both work)."""

    instruction: str = "instruction"
    input: list[str] = Field(default_factory=lambda: ["input", "context"])
    output: list[str] = Field(default_factory=lambda: ["output", "response"])


PartitionKind = Literal["iid", "dirichlet", "natural", "shards", "quantity", "label_quantity",
                        "embedding_cluster", "length"]


class PartitionConfig(_Section):
    """How the training rows are split over clients."""

    kind: PartitionKind = "iid"
    alpha: float = Field(default=0.5, gt=0)  # dirichlet concentration; quantity: power-law exponent
    by: str | None = None  # column for dirichlet / natural / shards (default: the label)
    shards_per_client: int = Field(default=2, ge=1)
    classes_per_client: int = Field(default=1, ge=1)  # label_quantity: exactly this many classes
    # embedding_cluster: k-means clusters; length: length bins (None: one per client); the
    # clusters or bins are then dealt by Dir(alpha) like classes
    groups: int | None = Field(default=None, ge=2)
    # embedding_cluster: the sentence encoder (a model preset, hub id or local directory)
    embedding_model: str = "minilm"
    min_size: int = Field(default=1, ge=1)


class DataConfig(_Section):
    """Where the data is, what format it has, and how it is partitioned."""

    path: str = Field(min_length=1)  # jsonl/json/csv/parquet file, or a saved HF dataset dir
    format: DataFormat
    validation_path: str | None = None  # global validation set; else a held-out share of `path`
    validation_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_rows: int | None = Field(default=None, ge=1)
    max_validation_rows: int | None = Field(default=None, ge=1)
    on_error: Literal["raise", "skip"] = "raise"
    # classification
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    label_names: list[str] | None = None
    # image (with label_field): pixel values (H x W [x C], 0..255) or an image file path
    image_field: str = "image"
    # audio (with text_field, the transcript): a WAV file path or a list of samples
    audio_field: str = "audio"
    sampling_rate: int = Field(default=16000, ge=1000)  # audio: rate of sample lists
    # instruction / chat / preference
    instruction_fields: InstructionFields = Field(default_factory=InstructionFields)
    prompt_template: Literal["alpaca", "plain"] = "alpaca"
    messages_field: str = "messages"
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    client_validation_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    # a column naming a known grouping (domain, language, category): each client's group is
    # its most common value (multi-domain adapters, cluster purity)
    group_by: str | None = None


# --------------------------------------------------------------------------- federation


class FederationConfig(_Section):
    """Who learns: how many clients, how many take part per round, for how many rounds."""

    num_clients: int = Field(default=10, ge=1)
    clients_per_round: int | None = Field(default=None, ge=1)
    fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    rounds: int = Field(default=5, ge=1)
    dropout_prob: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _one_way_to_sample(self) -> FederationConfig:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("set clients_per_round or fraction, not both")
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round={self.clients_per_round} exceeds "
                f"num_clients={self.num_clients}"
            )
        return self

    def sample_size(self) -> int:
        if self.clients_per_round is not None:
            return self.clients_per_round
        if self.fraction is not None:
            return max(1, round(self.fraction * self.num_clients))
        return self.num_clients


# --------------------------------------------------------------------------- algorithm


class LocalTrainingConfig(_Section):
    """What each client does with its data in one round."""

    steps: int | None = Field(default=None, ge=1)  # optimizer steps (10 if neither is set)
    epochs: float | None = Field(default=None, gt=0)  # passes over the client's data
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=None, gt=0)
    # Batches of similar-length examples (less padding, faster on short mixed-length text).
    group_by_length: bool = True
    # Causal LM only: pack several examples into each row of model.max_length tokens, each
    # attending only to itself (position ids restart per example); batch_size counts rows.
    packing: bool = False

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        steps, epochs = raw.get("steps"), raw.get("epochs")
        if steps is not None and epochs is not None:
            raise ValueError("set steps or epochs, not both")
        if steps is None and epochs is None:
            return {**raw, "steps": 10}
        return raw


ServerOptimizerName = Literal["sgd", "avgm", "adam", "yogi", "adagrad"]


class ServerOptimizerConfig(_Section):
    """FedOpt server optimizers (Reddi et al., ICLR 2021). ``sgd`` with lr=1 is plain FedAvg."""

    name: ServerOptimizerName = "sgd"
    lr: float = Field(default=1.0, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)  # avgm
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)  # adaptivity
    # v_{-1} for adaptive methods; None: tau**2 as in Reddi et al. (v_{-1} >= tau^2)
    initial_accumulator: float | None = Field(default=None, ge=0)


class RobustAggregationConfig(_Section):
    """Options of the robust aggregators (``algorithm.aggregator`` names the rule). ``f``, the
    number of Byzantine clients a rule must tolerate in a round of ``n``, is
    ``floor(byzantine_fraction * n)``. With LoRA, ``lora_space: product`` measures distances,
    norms and similarities on each adapted layer's ``B A`` (the change the model really sees)
    and ``factors`` on the raw ``A`` and ``B``; coordinate-wise rules always work on factors."""

    byzantine_fraction: float = Field(default=0.2, ge=0.0, lt=0.5)
    trim_ratio: float | None = Field(default=None, ge=0.0, lt=0.5)  # None: byzantine_fraction
    multi_krum_m: int | None = Field(default=None, ge=1)  # clients averaged; None: n - f
    lora_space: Literal["product", "factors"] = "product"
    geomed_iters: int = Field(default=100, ge=1)  # Weiszfeld iterations (RFA)
    geomed_tol: float = Field(default=1e-7, gt=0.0)
    # centered clipping radius tau and iterations; None: the median distance to the center
    cc_radius: float | None = Field(default=None, gt=0.0)
    cc_iters: int = Field(default=3, ge=1)
    norm_bound: float | None = Field(default=None, gt=0.0)  # None: the round's median norm
    dnc_iters: int = Field(default=5, ge=1)
    dnc_dim: int = Field(default=10000, ge=1)  # coordinates sampled per DnC iteration
    dnc_filter: float = Field(default=1.0, gt=0.0)  # DnC removes filter * f outliers
    root_rows: int = Field(default=100, ge=1)  # FLTrust: server root data (validation rows)


CompressorKind = Literal["quantize", "qsgd", "topk", "randk"]


class CompressorConfig(_Section):
    """One lossy step of ``algorithm.compression.chain`` (``fedfm.efficiency.compression``).

    ``quantize``: affine min-max quantization to ``bits`` (8, 4 or 2) with ``rounding``
    nearest (biased, error <= step / 2) or stochastic (unbiased); ``qsgd``: QSGD's unbiased
    sign + magnitude levels scaled by the L2 norm; one scale per tensor, or per ``block_size``
    values. ``topk`` keeps the ``fraction`` of largest-magnitude entries of each tensor (values +
    indices); ``randk`` keeps a random ``fraction`` (values + one seed: the server regenerates
    the indices), scaled by ``1 / fraction`` when ``unbiased``."""

    kind: CompressorKind
    bits: Literal[2, 4, 8] = 8
    rounding: Literal["nearest", "stochastic"] = "nearest"
    block_size: int | None = Field(default=None, ge=2)
    fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    unbiased: bool = False

    @model_validator(mode="after")
    def _fields_for_kind(self) -> CompressorConfig:
        sparse = self.kind in ("topk", "randk")
        if sparse and self.fraction is None:
            raise ValueError(f"{self.kind} needs fraction (the share of entries kept, in (0, 1])")
        if not sparse and self.fraction is not None:
            raise ValueError(f"fraction applies to topk and randk, not {self.kind}")
        if self.unbiased and self.kind != "randk":
            raise ValueError("unbiased applies to randk (qsgd and quantize with rounding: "
                             "stochastic are unbiased by construction)")
        return self


class CompressionConfig(_Section):
    """Client-side encoding of the update, server-side decoding (``chain`` runs in order: a
    sparsifier first, then a quantizer of its kept values); ``error_feedback`` keeps each
    client's compression error and adds it to its next update."""

    chain: list[CompressorConfig] = Field(min_length=1)
    error_feedback: bool = False


class RankTier(_Section):
    rank: int = Field(ge=1)
    fraction: float = Field(gt=0.0, le=1.0)


class LoraAlgorithmConfig(_Section):
    """Options of the LoRA-aware algorithms (``fedfm.efficiency.lora``). Per-client ranks for
    hetlora, flexlora and flora: ``ranks`` (one per client) or capability ``tiers`` (the first
    ``fraction`` of client ids get the first tier's rank, and so on; ids are already shuffled by
    the partition); none: every client trains ``adapter.r``."""

    ranks: list[int] | None = None
    tiers: list[RankTier] | None = None
    # HetLoRA: rank self-pruning keeps the leading gamma share of a client's rank and regularises
    # the rest with weight prune_lambda; the rank shrinks when the tail's norm stops growing
    prune_gamma: float = Field(default=0.9, gt=0.0, lt=1.0)
    prune_lambda: float = Field(default=1e-3, ge=0.0)
    self_prune: bool = True
    # HetLoRA: weight each client by the Frobenius norm of its B A (sparsity-weighted)
    norm_weighting: bool = True

    @model_validator(mode="after")
    def _one_rank_rule(self) -> LoraAlgorithmConfig:
        if self.ranks is not None and self.tiers is not None:
            raise ValueError("set ranks or tiers, not both")
        if self.ranks is not None and (not self.ranks or min(self.ranks) < 1):
            raise ValueError("ranks must be a non-empty list of positive integers")
        if self.tiers is not None:
            total = sum(tier.fraction for tier in self.tiers)
            if not self.tiers or abs(total - 1.0) > 1e-6:
                raise ValueError(f"tiers' fractions must add up to 1 (they add up to {total:g})")
        return self


class ZerothOrderConfig(_Section):
    """Zeroth-order local training (``fedfm.efficiency.zeroth_order``): two forward passes per
    step at ``theta +- eps z`` estimate the directional derivative along a Gaussian ``z``; the
    step is ``-lr g z`` (``algorithm.local``'s lr, steps or epochs, batch size). FedKSeed draws
    ``z`` from a shared pool of ``num_seeds`` seeds (made from ``pool_seed``) and uploads only
    (seed index, g) pairs; FedZO averages ``directions`` fresh directions per step and uploads
    the model delta."""

    eps: float = Field(default=1e-3, gt=0.0)
    num_seeds: int = Field(default=4096, ge=1)
    pool_seed: int = 0
    directions: int = Field(default=1, ge=1)


class BlackBoxConfig(_Section):
    """FedBPT (``fedfm.trust.ip.fedbpt``): clients search ``intrinsic_dim`` coordinates ``z``
    with CMA-ES (``population`` candidates per generation, ``generations`` per round, one batch
    of ``algorithm.local.batch_size`` per generation); the adapter's tensors are
    ``theta_0 + A z`` for a fixed seeded random ``A``. ``sigma`` is CMA-ES's first step size."""

    intrinsic_dim: int = Field(default=500, ge=1)
    population: int = Field(default=20, ge=2)
    generations: int = Field(default=8, ge=1)
    sigma: float = Field(default=1.0, gt=0.0)


class PublicDataConfig(_Section):
    """Unlabeled public data that the server may use (distillation): any source ``data.path``
    accepts (jsonl/json/csv/parquet file, saved HF dataset dir, hub id with ``:split``). Only
    the input text is read: ``text_field`` (and ``text_pair_field``), or, when unset, the run's
    own input fields (``data.text_field`` for classification, the instruction prompt for
    instruction data, the conversation for chat data). Labels, if present, are ignored."""

    path: str = Field(min_length=1)
    text_field: str | None = None
    text_pair_field: str | None = None
    max_rows: int | None = Field(default=512, ge=1)


class DistillConfig(_Section):
    """Server-side knowledge distillation on ``public`` data (``fedfm.efficiency.distillation``).
    FedDF (``algorithm.name: feddf``): after aggregation the global model is trained for
    ``steps`` Adam steps (``lr``, ``batch_size``) to match the averaged, temperature-``T``
    softened logits of the round's client models. FedMKT (``algorithm.name: fedmkt``): the
    server also holds ``server_model`` (a larger model, with ``server_adapter`` or the run's
    adapter); each round the clients' ensemble teaches it (``server_steps``) on the public data,
    and its logits there are broadcast: the clients train on their own loss plus
    ``client_weight`` times the distillation loss towards them."""

    public: PublicDataConfig
    steps: int = Field(default=50, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    temperature: float = Field(default=1.0, gt=0.0)
    server_model: ModelConfig | None = None  # fedmkt: the large model the server holds
    server_adapter: AdapterConfig | None = None  # fedmkt: None: the run's adapter section
    server_steps: int | None = Field(default=None, ge=1)  # fedmkt: steps into the large model
    client_weight: float = Field(default=1.0, ge=0.0)  # fedmkt: KD weight in the clients' loss


class SplitConfig(_Section):
    """Split learning (``algorithm.name: splitfed``; ``fedfm.efficiency.split``): the client
    holds the embeddings and the first ``cut_layer`` transformer blocks (with their adapters),
    the server the rest and the head; per step the client sends the cut layer's activations
    (cast to ``activation_dtype`` on the wire) and receives their gradients."""

    cut_layer: int = Field(default=1, ge=1)
    activation_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class OffsiteConfig(_Section):
    """Offsite tuning (``algorithm.name: fedot``; ``fedfm.trust.ip.offsite``): the owner keeps
    the full model and gives clients an emulator that keeps the bottom ``bottom`` and top
    ``top`` blocks (the only ones with adapters) and a uniformly spaced ``1 - drop`` share of
    the middle blocks."""

    drop: float = Field(default=0.5, ge=0.0, lt=1.0)
    bottom: int = Field(default=1, ge=1)
    top: int = Field(default=1, ge=1)


class PersonalConfig(_Section):
    """Personalization (``fedfm.adaptability.personalization``). FedPer / FedRep
    (``algorithm.name: fedper | fedrep``): the tensors whose names contain one of ``head``
    (None: the task head, e.g. ``classifier`` / ``score``) stay on each client; FedRep first
    trains the head alone for ``head_steps`` steps, then the body with the head frozen. Ditto
    (``ditto``): beside the federated model each client trains a personal one for
    ``personal_steps`` steps (None: ``algorithm.local`` steps) on its loss plus
    ``lam``/2 ||personal - global||^2. Dual adapters (``dual_lora``): a second, local LoRA
    adapter of rank ``personal_r`` (None: ``adapter.r``) is active beside the federated one."""

    head: list[str] | None = None
    head_steps: int = Field(default=5, ge=1)
    lam: float = Field(default=0.1, ge=0.0)
    personal_steps: int | None = Field(default=None, ge=1)
    personal_r: int | None = Field(default=None, ge=1)


class ClusterConfig(_Section):
    """Clustered federated learning (``fedfm.adaptability.clustering``). IFCA
    (``algorithm.name: ifca``): ``k`` cluster models; each client takes the one with the lowest
    loss on its training data. CFL (``cfl``): one cluster to start; a cluster whose mean update
    norm is below ``eps1`` while its largest client update norm is above ``eps2`` is split in
    two by the cosine similarity of its clients' updates, up to ``max_clusters``."""

    k: int = Field(default=2, ge=1)
    eps1: float = Field(default=0.4, ge=0.0)
    eps2: float = Field(default=1.6, ge=0.0)
    max_clusters: int = Field(default=8, ge=1)
    min_cluster_size: int = Field(default=2, ge=1)  # CFL never splits off fewer clients


class DomainConfig(_Section):
    """Multi-domain adaptation (``algorithm.name: domain_lora``;
    ``fedfm.adaptability.domains``): every client trains a shared LoRA adapter, averaged over
    all clients, and the adapter of its domain (its ``data.group_by`` value), averaged over
    that domain's clients. ``router``: instead of the client's own domain adapter, a learned
    softmax gate mixes all domain adapters per input."""

    router: bool = False
    # domain values in adapter order (the remote runtime needs them; None: the sorted
    # data.group_by values of the data)
    names: list[str] | None = None


class DPOConfig(_Section):
    """Direct Preference Optimization (``algorithm.name: fed_dpo``;
    ``fedfm.adaptability.preference``): loss -log sigma(beta * margin) on prompt / chosen /
    rejected pairs, with the base model (adapter disabled) as the frozen reference;
    ``label_smoothing`` is the conservative-DPO flip probability."""

    beta: float = Field(default=0.1, gt=0.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)


class SkewConfig(_Section):
    """One method against data skew layered on the algorithm (``algorithm.skew``, a list;
    ``fedfm.adaptability.heterogeneity``). FedLC (``name: fedlc``): each client trains on
    logits shifted by ``-tau * n_c^(-1/4)`` for its class counts ``n_c``. FedRS (``fedrs``): the
    logits of classes a client lacks are scaled by ``alpha``. MOON (``moon``): ``mu`` times a
    contrastive loss at ``temperature`` pulls each representation toward the global model's
    and away from the client's previous one. FedBABU (``fedbabu``): the head (tensors whose
    names contain one of ``head``; None: the task head) stays at its shared initialisation;
    in the last ``head_rounds`` rounds only the head trains. FedNova (``fednova``): each update
    is normalized by its number of local steps before averaging."""

    name: str = Field(min_length=1)  # checked against the skew-method registry
    tau: float = Field(default=1.0, gt=0.0)  # fedlc
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)  # fedrs
    mu: float = Field(default=1.0, ge=0.0)  # moon
    temperature: float = Field(default=0.5, gt=0.0)  # moon
    head: list[str] | None = None  # fedbabu
    head_rounds: int = Field(default=0, ge=0)  # fedbabu


class AlgorithmConfig(_Section):
    """How clients learn: the client procedure and the server rule, found by name."""

    name: str = "fedavg"  # checked against the algorithm registry when the run is built
    aggregator: str = "mean"  # checked against the aggregator registry
    mu: float = Field(default=0.0, ge=0)  # fedprox proximal weight
    weighting: Literal["examples", "uniform"] = "examples"
    robust: RobustAggregationConfig = Field(default_factory=RobustAggregationConfig)
    local: LocalTrainingConfig = Field(default_factory=LocalTrainingConfig)
    server_optimizer: ServerOptimizerConfig = Field(default_factory=ServerOptimizerConfig)
    compression: CompressionConfig | None = None  # None: updates travel as dense tensors
    lora: LoraAlgorithmConfig = Field(default_factory=LoraAlgorithmConfig)
    zo: ZerothOrderConfig = Field(default_factory=ZerothOrderConfig)
    bpt: BlackBoxConfig = Field(default_factory=BlackBoxConfig)
    distill: DistillConfig | None = None  # feddf / fedmkt
    split: SplitConfig = Field(default_factory=SplitConfig)
    offsite: OffsiteConfig = Field(default_factory=OffsiteConfig)
    personal: PersonalConfig = Field(default_factory=PersonalConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    domains: DomainConfig = Field(default_factory=DomainConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    skew: list[SkewConfig] = Field(default_factory=list)  # applied in order, see SkewConfig

    @model_validator(mode="after")
    def _zeroth_order_is_plain_sgd(self) -> AlgorithmConfig:
        if self.name in ("fedkseed", "fedzo") and (
                self.local.optimizer != "sgd" or self.local.momentum != 0
                or self.local.grad_accum != 1):
            raise ValueError(
                f"{self.name} takes plain zeroth-order SGD steps: set algorithm.local.optimizer "
                f"'sgd' with momentum 0 and grad_accum 1 (its update -lr g z is what the "
                f"server replays)")
        return self

    @model_validator(mode="after")
    def _scaffold_needs_sgd(self) -> AlgorithmConfig:
        if self.name == "scaffold" and self.local.optimizer != "sgd":
            raise ValueError(
                "algorithm.local.optimizer must be 'sgd' for scaffold: its control variates "
                "(x - y)/(K lr) estimate gradients only under plain SGD steps")
        return self


# ------------------------------------------------------------- runtime / eval / tracking


RAY_FIELDS = frozenset({"address", "num_actors", "actor_cpus", "actor_gpus", "actor_memory_mb",
                        "min_actors"})


class RuntimeConfig(_Section):
    """Where it runs and how fast. ``device: auto`` picks CUDA when present. ``precision``:
    ``fp32``; ``bf16`` (frozen base weights stored in bf16 once, trainable parameters and
    optimizer state in fp32, bf16 autocast); ``auto`` is bf16 on CUDA and fp32 on CPU.
    ``attention: auto`` times each implementation the model supports on a real batch and keeps
    the fastest. ``fused_loss`` computes causal-LM losses chunk by chunk without full-vocabulary
    logits. ``compile`` wraps the model's backbone in ``torch.compile`` once per process.
    ``prefix_cache`` computes a frozen bottom's output once per example and replays it."""

    kind: str = "local"  # checked against the runtime registry when the run is built
    clients_per_pass: int = Field(default=8, ge=1)  # batched: clients in one forward/backward
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    attention: Literal["auto", "eager", "sdpa"] = "auto"
    fused_loss: bool = True
    compile: bool = False
    # Frozen-prefix caching (head-only / top-layer tuning): auto = on when the bottom blocks are
    # frozen and a probe batch agrees with recomputation; entries beyond the memory budget go
    # to a file in prefix_cache_dir (default: the system temp dir).
    prefix_cache: Literal["auto", "on", "off"] = "auto"
    prefix_cache_memory_mb: float = Field(default=2048.0, ge=0.0)
    prefix_cache_dir: str | None = None
    num_threads: int | None = Field(default=None, ge=1)
    # Where per-client state (SCAFFOLD controls, ...) lives between rounds: tiered keeps the
    # most recently used states in memory up to client_store_memory_mb, the rest on disk.
    client_store: Literal["tiered", "memory", "disk"] = "tiered"
    client_store_memory_mb: float = Field(default=512.0, ge=0.0)
    # kind: ray -- an actor pool, each actor holding one base model and serving many clients.
    # address: an existing cluster ("auto", "HOST:6379", "ray://HOST:10001"); None starts a
    # local Ray instance. actor_gpus None: one GPU per actor when the cluster has enough, a
    # share of them when it has fewer, none without. Fewer than min_actors alive: the run stops
    # (resume it from its last checkpoint).
    address: str | None = None
    num_actors: int = Field(default=2, ge=1)
    actor_cpus: float = Field(default=1.0, gt=0.0)
    actor_gpus: float | None = Field(default=None, ge=0.0)
    actor_memory_mb: float | None = Field(default=None, gt=0.0)
    min_actors: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _ray_settings_need_ray(self) -> RuntimeConfig:
        # a setting away from its default (a dumped config repeats every default)
        given = sorted(name for name in RAY_FIELDS
                       if getattr(self, name) != type(self).model_fields[name].default)
        if given and self.kind != "ray":
            raise ValueError(f"runtime.{given[0]} applies to runtime.kind 'ray' (this run's "
                             f"kind is {self.kind!r})")
        if self.min_actors > self.num_actors:
            raise ValueError(f"runtime.min_actors ({self.min_actors}) exceeds "
                             f"runtime.num_actors ({self.num_actors})")
        return self

    @model_validator(mode="after")
    def _cache_or_compile(self) -> RuntimeConfig:
        if self.prefix_cache == "on" and self.compile:
            raise ValueError("prefix_cache: 'on' cannot be combined with compile: true (the "
                             "cache swaps the block list per call, which defeats the compiled "
                             "graph); use one of them")
        return self


class GenerationEvalConfig(_Section):
    """ROUGE-L on greedy generations for a sample of the validation set (LM tasks)."""

    enabled: bool = False
    num_samples: int = Field(default=16, ge=1)
    max_new_tokens: int = Field(default=32, ge=1)


class CanaryConfig(_Section):
    """Random secrets planted in one client's data to measure memorization (exposure; Carlini
    et al., USENIX Security 2019). Causal LM data only."""

    client: int = Field(default=0, ge=0)
    count: int = Field(default=4, ge=1)  # distinct canaries
    repeats: int = Field(default=8, ge=1)  # copies of each in the client's training data
    secret_length: int = Field(default=6, ge=1, le=12)  # digits: 10^L possible secrets
    candidates: int = Field(default=2000, ge=10)  # random secrets each canary is ranked among


class EvalConfig(_Section):
    """Global and per-client evaluation every ``every`` rounds and after the last one."""

    enabled: bool = True  # False: no evaluation at all (benchmarks)
    every: int = Field(default=1, ge=1)
    at_start: bool = False  # also evaluate the initial model (round 0)
    per_client: bool = True
    batch_size: int = Field(default=32, ge=1)
    max_examples: int | None = Field(default=None, ge=1)  # cap on the global validation set
    generation: GenerationEvalConfig = Field(default_factory=GenerationEvalConfig)
    canaries: CanaryConfig | None = None  # plant secrets to measure memorization (exposure)
    # > 0: personalized metrics also fine-tune each client's model this many local steps on
    # its own training split first (local fine-tuning after federation)
    finetune_steps: int = Field(default=0, ge=0)


class TrackingConfig(_Section):
    """Where the run directory goes, how often the global State is checkpointed, and which
    metrics sinks receive each round's record (``metrics.jsonl`` always does)."""

    output_dir: str = "runs"
    run_name: str | None = None  # default: the config's name + a timestamp
    checkpoint_every: int = Field(default=1, ge=1)
    keep_checkpoints: int | None = Field(default=None, ge=1)  # None: keep all
    console: bool = True
    tensorboard: bool = False  # RUN_DIR/tensorboard (the `tensorboard` extra)
    mlflow: bool = False  # the `mlflow` extra
    mlflow_tracking_uri: str | None = None  # None: sqlite:///RUN_DIR/mlflow.db (local)
    mlflow_experiment: str = Field(default="fedfm", min_length=1)


# --------------------------------------------------------------------------- privacy


class AdaptiveClipConfig(_Section):
    """Quantile-based adaptive clipping (Andrew et al., NeurIPS 2021): the clip norm follows the
    ``target_quantile`` of the clients' update norms, estimated privately each round."""

    target_quantile: float = Field(default=0.5, gt=0.0, lt=1.0)
    learning_rate: float = Field(default=0.2, gt=0.0)  # geometric step: C *= exp(-lr (b - q))
    # noise on the count of unclipped clients; None: max(expected clients per round / 20 (the
    # paper's choice), noise_multiplier)
    count_noise_multiplier: float | None = Field(default=None, gt=0.0)


class ClientDPConfig(_Section):
    """Client-level differential privacy (DP-FedAvg; McMahan et al., ICLR 2018): each client's
    update is clipped to ``clip_norm`` in L2, Gaussian noise of std ``noise_multiplier *
    clip_norm`` is added to their sum (by the server: ``central``; in shares by the clients:
    ``distributed``, for secure aggregation), and the sum is divided by the expected number of
    clients. A dp-accounting accountant tracks epsilon at ``delta`` round by round."""

    noise: Literal["central", "distributed"] = "central"
    clip_norm: float = Field(default=1.0, gt=0.0)  # the initial norm when adaptive_clip is set
    adaptive_clip: AdaptiveClipConfig | None = None
    noise_multiplier: float | None = Field(default=None, ge=0.0)
    target_epsilon: float | None = Field(default=None, gt=0.0)  # calibrates noise_multiplier
    delta: float | None = Field(default=None, gt=0.0, lt=1.0)  # None: 1 / num_clients^1.1
    # poisson: each client joins a round independently with prob clients_per_round/num_clients
    # (what the accountant assumes); fixed: exactly clients_per_round (replace-one accounting)
    sampling: Literal["poisson", "fixed"] = "poisson"
    accountant: Literal["rdp", "pld"] = "rdp"
    # false: the noise is seeded from (seed, round, client) so simulations reproduce; true:
    # drawn from the OS's CSPRNG, as a deployment must
    secure_noise: bool = False

    @model_validator(mode="after")
    def _one_noise_source(self) -> ClientDPConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy.client_dp: set exactly one of noise_multiplier and "
                             "target_epsilon")
        if self.accountant == "pld" and self.sampling != "poisson":
            raise ValueError("privacy.client_dp: the pld accountant supports poisson sampling "
                             "only (use accountant: rdp for fixed-size sampling)")
        return self


class DPSGDConfig(_Section):
    """Sample-level DP-SGD in each client's local training (Abadi et al., CCS 2016): Poisson
    sampling of the client's examples at rate batch_size / n, per-example clipping of the
    adapter's gradients, Gaussian noise; epsilon is accounted per client."""

    noise_multiplier: float = Field(ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)  # per-example L2 clip
    delta: float | None = Field(default=None, gt=0.0, lt=1.0)  # None: 1e-5 (< 1/n up to 1e5 rows)
    secure_noise: bool = False  # true: noise from the OS CSPRNG instead of the run's seed
    # per-example gradients: Opacus' hooks over a padded batch ("opacus"), one backward pass per
    # example ("loop"), or Opacus whenever it covers every trainable layer ("auto")
    per_sample: Literal["auto", "opacus", "loop"] = "auto"


class SecureAggregationConfig(_Section):
    """SecAgg+ (Bell et al., CCS 2020): the server learns only the sum of the round's updates.
    Each client shares its secrets with ``degree`` neighbours (None: every other client, as in
    SecAgg), any ``threshold`` of whom can recover them after dropouts."""

    degree: int | None = Field(default=None, ge=2)
    threshold: int | None = Field(default=None, ge=1)  # None: 60% of the neighbourhood
    bound: float = Field(default=1000.0, gt=0.0)  # |value| range of the fixed-point encoding
    frac_bits: int = Field(default=24, ge=8, le=40)
    # simulation: share of clients that vanish after key sharing (their input never arrives)
    simulate_dropout_prob: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _threshold_is_a_majority(self) -> SecureAggregationConfig:
        if self.threshold is not None and self.degree is not None and (
                2 * self.threshold <= self.degree + 1 or self.threshold > self.degree + 1):
            raise ValueError(f"privacy.secure_aggregation.threshold must be a majority of the "
                             f"{self.degree + 1} clients of a neighbourhood (more than "
                             f"{(self.degree + 1) / 2:g}, at most {self.degree + 1}): fewer "
                             f"would let a server that lies about dropouts unmask one client")
        return self


class AttackConfig(_Section):
    """Simulated Byzantine clients: a fixed ``fraction`` of all clients (drawn from the run's
    seed) are malicious. Data poisoning (``label_flip``, ``backdoor``) changes their training
    data; model poisoning (``sign_flip``, ``gaussian``, ``scaling``, ``alie``, ``ipm``,
    ``min_max``, ``min_sum``) replaces their updates, seeing every honest update of the round
    as the papers assume."""

    kind: str  # checked against the poisoning-attack registry
    fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    # data poisoning: share of a malicious client's examples poisoned (None: all for label
    # flipping, half for backdoors)
    poison_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    trigger: str = "cf mn bb"  # backdoor trigger phrase, prepended to the input text
    target_label: int = Field(default=0, ge=0)  # backdoor target class (classification)
    target_response: str = "I cannot help with that."  # backdoor target response (LMs)
    scale: float | None = Field(default=None, gt=0.0)  # scaling boost; None: clients per round
    noise_std: float = Field(default=1.0, gt=0.0)  # gaussian: std of each coordinate
    alie_z: float | None = None  # ALIE's z; None: the paper's z_max for (n, f)
    ipm_epsilon: float = Field(default=0.1, gt=0.0)  # IPM: sends -epsilon * benign mean
    # min-max / min-sum perturbation direction: unit_vector (-mean/|mean|), std (-std), sign
    perturbation: Literal["unit_vector", "std", "sign"] = "std"


class RobustnessConfig(_Section):
    """Robustness experiments: simulated attacks (robust rules: ``algorithm.aggregator``)."""

    attack: AttackConfig | None = None


class PrivacyConfig(_Section):
    """Privacy mechanisms of the run (none by default); they compose."""

    client_dp: ClientDPConfig | None = None
    dp_sgd: DPSGDConfig | None = None
    secure_aggregation: SecureAggregationConfig | None = None


class DeployConfig(_Section):
    """Round control of a real deployment (``fedfm server``; the ``remote`` runtime). A round
    starts once ``min_clients`` clients are online (None: as many as a round takes); it selects
    ``clients_per_round`` of the online clients plus ``over_selection`` more (Bonawitz et al.,
    "Towards Federated Learning at Scale", MLSys 2019), closes as soon as ``clients_per_round``
    updates are accepted or at ``round_timeout_s``, and aggregates if at least ``min_updates``
    arrived (the dropout tolerance; else the round is aborted and keeps the global State)."""

    min_clients: int | None = Field(default=None, ge=1)  # None: the clients per round
    round_timeout_s: float = Field(default=600.0, gt=0.0)
    over_selection: float = Field(default=0.0, ge=0.0, le=2.0)  # 0.3: select 30% more
    min_updates: int = Field(default=1, ge=1)
    max_upload_mb: float | None = Field(default=None, gt=0.0)  # None: 4x the State + 1 MB
    heartbeat_s: float = Field(default=10.0, gt=0.0)
    offline_after_s: float = Field(default=60.0, gt=0.0)  # no request for this long: offline
    long_poll_s: float = Field(default=25.0, gt=0.0, le=120.0)
    # secure aggregation over the network: each protocol step after training waits this long
    secagg_step_timeout_s: float = Field(default=60.0, gt=0.0)


class RunConfig(_Section):
    """A whole federated run."""

    name: str = "fedfm-run"
    seed: int = 0
    model: ModelConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig
    federation: FederationConfig = Field(default_factory=FederationConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.adapter.kind == "head" and self.data.format not in ("classification", "image"):
            raise ValueError("adapter.kind: 'head' needs data.format 'classification' "
                             f"(got {self.data.format!r})")
        canaries = self.eval.canaries
        if canaries is not None and self.data.format not in ("instruction", "chat"):
            raise ValueError("eval.canaries needs causal-LM data (data.format instruction or "
                             f"chat), got {self.data.format!r}")
        if canaries is not None and canaries.client >= self.federation.num_clients:
            raise ValueError(f"eval.canaries.client={canaries.client} but there are only "
                             f"{self.federation.num_clients} clients")
        dp = self.privacy.client_dp
        if dp is not None and self.algorithm.name == "scaffold":
            raise ValueError("privacy.client_dp cannot be combined with algorithm scaffold: its "
                             "control-variate updates would leak client data unclipped and "
                             "unnoised (use fedavg, fedprox or a FedOpt server optimizer)")
        if self.privacy.dp_sgd is not None and self.algorithm.local.grad_accum != 1:
            raise ValueError("privacy.dp_sgd needs algorithm.local.grad_accum: 1 (each step "
                             "is one Poisson-sampled batch)")
        if self.privacy.dp_sgd is not None and self.algorithm.local.packing:
            raise ValueError("privacy.dp_sgd cannot be combined with algorithm.local.packing: "
                             "a packed row holds several examples, so clipping per row would "
                             "not bound any one example's influence")
        if self.privacy.secure_aggregation is not None and self.algorithm.name == "scaffold":
            raise ValueError("privacy.secure_aggregation cannot be combined with algorithm "
                             "scaffold: secure aggregation releases only sums of the updates, "
                             "and scaffold's control-variate updates would travel in the clear")
        self._check_lora_ranks()
        if dp is not None and dp.noise == "distributed" and dp.sampling != "fixed":
            raise ValueError("privacy.client_dp.noise: 'distributed' needs sampling: 'fixed' "
                             "(each client's noise share is sized by the known number of "
                             "clients per round)")
        return self

    def _check_lora_ranks(self) -> None:
        lora = self.algorithm.lora
        if lora.ranks is None and lora.tiers is None:
            return
        where = "algorithm.lora.ranks" if lora.ranks is not None else "algorithm.lora.tiers"
        if self.algorithm.name not in ("hetlora", "flexlora", "flora"):
            raise ValueError(f"{where} gives clients different LoRA ranks, which only hetlora, "
                             f"flexlora and flora aggregate (algorithm.name is "
                             f"{self.algorithm.name!r})")
        if lora.ranks is not None and len(lora.ranks) != self.federation.num_clients:
            raise ValueError(f"algorithm.lora.ranks has {len(lora.ranks)} entries for "
                             f"{self.federation.num_clients} clients (one per client)")
        ranks = lora.ranks or [tier.rank for tier in lora.tiers or []]
        if max(ranks) > self.adapter.r:
            raise ValueError(f"{where}: rank {max(ranks)} exceeds adapter.r={self.adapter.r}, "
                             f"the largest rank the global adapter holds")

    def config_hash(self) -> str:
        """sha256 over the canonical JSON of the config (what `summary.json` records)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------- loading


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "<root>"
        kind = item["type"]
        bad = item.get("input")
        if kind == "extra_forbidden":
            lines.append(f"  {path}: unknown key (value {bad!r})")
            continue
        message = item["msg"]
        if kind == "missing":
            lines.append(f"  {path}: required field is missing")
        elif kind == "value_error" or isinstance(bad, dict):
            # a cross-field check: its message names the fields; don't dump the section
            lines.append(f"  {path}: {message.removeprefix('Value error, ')}")
        else:
            shown = repr(bad)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            lines.append(f"  {path}: {message} (got {shown})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (``3``, ``1e-3``, ``[q]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. algorithm.local.lr=1e-3")
    key, raw_value = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b=c`` overrides into a raw config mapping (creating sections as needed)."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"override {text!r}: {where} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {file} is not valid YAML: {exc}") from exc
    if raw is None:
        raise ConfigError(f"config file {file} is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {file}: expected a mapping at the top level")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML, apply ``a.b=c`` overrides, validate everything.

    Relative data paths are resolved against the current directory first, then the config
    file's directory (so ``fedfm run examples/x.yaml`` works from anywhere).
    """
    raw = apply_overrides(read_yaml(path), list(overrides or []))
    config = config_from_dict(raw, source=str(path))
    return _resolve_data_paths(config, Path(path).resolve().parent)


def _resolve_data_paths(config: RunConfig, config_dir: Path) -> RunConfig:
    for field in ("path", "validation_path"):
        value = getattr(config.data, field)
        if value is None:
            continue
        file_part, sep, split = value.partition("::")  # "dir::split": a saved dataset's split
        if Path(file_part).is_absolute():
            continue
        # absolute, so a run resumed from another directory still finds its data
        for base in (Path.cwd(), config_dir):
            if (base / file_part).exists():
                setattr(config.data, field, str((base / file_part).resolve()) + sep + split)
                break
    return config


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
