"""The run configuration the engine takes: a typed record built from a command line.

The engine's own fields (data, optimisation, run control, speed) are typed
fields; the method's flags stay in ``options`` (their names are the method's
business, declared by its :class:`pruning.registry.MethodSpec`). ``name`` is the
default run directory's name and ``identity`` the settings a checkpoint must
agree on to be resumed, both decided by the command line that builds the
config (the training scripts from the method's spec, prune.py per phase).
"""
import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace


@dataclass
class RunConfig:
    model: str                          # the model family (a models registry name)
    imagenet: bool                      # ImageNet-style data and reporting (top-5)
    method: str                         # the method's registry name
    name: str                           # default run directory: runs/<name>
    identity: tuple[str, ...]           # settings a resumed checkpoint must agree on
    dataset: str
    data_dir: str | None
    num_classes: int | None
    dummy: bool
    workers: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    epochs: int
    fine_tune_epoch: int = 0
    nesterov: bool = False
    lr_decay: float = 1.0
    milestones: tuple[int, ...] = ()
    lr_schedule: dict | None = None     # {first epoch: lr}, piecewise constant (GReg's --lr_ft)
    lr_cosine: bool = False             # the cosine of HSIC-Lasso's fine-tuning
    width_mult: float = 1.0
    cost_convention: str = "conv"       # the MACs results.json reports: conv+linear, or thop's count
    gpu: int | None = None
    seed: int | None = None
    resume: str | None = None
    out_dir: str | None = None
    print_freq: int = 100
    limit_batches: int | None = None
    save_epoch: int = 0
    max_grad_norm: float | None = None
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    loader: str = "auto"
    augment: bool | None = None         # False: CIFAR without random crop and flip (--no-augment); None: augmented
    validate_set: bool | None = None    # True: hold out the training set's last images and report them (--validate-set)
    options: SimpleNamespace = field(default_factory=SimpleNamespace)  # the method's flags

    @classmethod
    def engine_fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"options"}

    @classmethod
    def from_namespace(cls, args, **fields) -> "RunConfig":
        """Engine fields from ``args`` (and ``fields``, which win); every other attribute of ``args``
        becomes an option."""
        values = {**vars(args), **fields}
        engine = cls.engine_fields()
        own = {k: v for k, v in values.items() if k in engine}
        options = SimpleNamespace(**{k: v for k, v in values.items() if k not in engine})
        return cls(**own, options=options)

    def __getattr__(self, key: str):
        # Only reached for names that are not fields: the method's options read as attributes too
        # (``config.lamba``), so a method can take the config where it took the parsed namespace.
        if key == "options":
            raise AttributeError(key)
        try:
            return getattr(self.options, key)
        except AttributeError:
            raise AttributeError(f"RunConfig has no field or option {key!r}") from None

    def get(self, key: str, default=None):
        """An engine field or an option by name."""
        if key in self.engine_fields():
            return getattr(self, key)
        return getattr(self.options, key, default)

    def to_dict(self) -> dict:
        """Flat ``{name: value}`` of every field and option: what a checkpoint records as its ``args``."""
        out = {k: getattr(self, k) for k in self.engine_fields()}
        out["identity"] = list(self.identity)
        out.update(vars(self.options))
        return out
