"""The method registry: every method declares itself here.

A method is a :class:`MethodSpec`: its name and the other spellings users type,
its flags (with their defaults), the settings that identify a run of it (a
checkpoint resumes only a run that agrees on them) and how it runs. The
command lines read the registry, so adding a method is one module that
implements it and a spec that declares it and is registered in one line
(``pruning/specs.py`` holds the project's; a test registers its own). A spec
imports no torch: its method's module is imported by :meth:`MethodSpec.build`
or :meth:`MethodSpec.run`, when a run starts.

Two kinds, by the script that runs them:

- ``train``: selected on the training scripts (``--net``, ``--sparse``); the spec
  builds the in-loop :class:`pruning.method.PruningMethod` the engine calls at
  every step (:meth:`MethodSpec.build`).
- ``prune``: selected by ``prune.py --method`` on a dense baseline; the spec
  runs its phases (a one-shot cut, a regularisation phase, fine-tuning) through
  the :class:`Job` that prune.py hands it (:meth:`MethodSpec.run`). Methods never
  import the engine: the job is how they reach it.
"""
import argparse
from typing import Protocol


class Job(Protocol):
    """What prune.py offers a ``prune`` method's :meth:`MethodSpec.run` (``PruneJob`` in
    engine/prune_job.py has the details): the command line, the dense network, the run directory and
    the engine."""

    args: argparse.Namespace  # the parsed command line, the method's defaults filled in

    def dense_model(self): ...
    def absolute_target(self) -> int | None: ...
    def start(self, label: str, how: str): ...
    def config(self, settings: tuple[str, ...] = (), **fields): ...
    def train(self, config, method, start=None, extra_results=None, results_file="results.json") -> int: ...
    def fine_tune(self, cut, schedule: dict, settings: tuple[str, ...], extra: dict, method=None) -> int: ...
    def read_cut(self, cut) -> dict: ...
    def save_cut(self, model, path, gates, **info) -> None: ...


class MethodSpec:
    """One method's declaration. Subclasses set the class attributes and override what they use."""

    name: str = ""                   # the canonical name (results.json's ``method``, run names)
    aliases: tuple[str, ...] = ()    # other spellings accepted on the command line
    kind: str = "train"              # "train" (training scripts) or "prune" (prune.py)
    settings: tuple[str, ...] = ()   # argparse dests that identify a run (checked on resume)
    summary: str = ""                # one line for --help
    # A training-script method is chosen by a flag and value: ("--net", "hc"), ("--sparse", "dsr") ...
    selected_by: tuple[str, str] = ("", "")

    # -- command line ------------------------------------------------------------------------

    def add_arguments(self, parser: argparse.ArgumentParser, **context) -> None:
        """Add this method's flags (an argument group of its own) to ``parser``. ``context`` carries
        what defaults may depend on (the training scripts pass their ``recipe``). A flag shared by
        several specs is added once: specs check ``parser`` before adding."""

    def own_flags(self) -> tuple[str, ...]:
        """Option strings only this method takes: others refuse them with one line."""
        return ()

    def check(self, parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str]) -> None:
        """Refuse what does not combine (``parser.error``), fill defaults that depend on other flags."""

    # -- train -------------------------------------------------------------------------------

    def recipe_fields(self, recipe) -> dict:
        """Fields of the training script's recipe this method replaces (its own schedule)."""
        return {}

    def foreign_flag_message(self, flag: str, args) -> str:
        """The one line that refuses this method's ``flag`` on a run of another method."""
        return f"{flag} belongs to {self.name}"

    def run_label(self, args) -> str:
        """The method's part of the default run directory name."""
        return self.name

    def arch_options(self, args) -> dict:
        """Keyword arguments of the model's arch that this method decides (its gates)."""
        return dict(net="dense")

    def build(self, model, config):
        """The in-loop method of a training run (``config``: engine.config.RunConfig)."""
        raise NotImplementedError(f"{self.name} is not a training-script method")

    # -- prune -------------------------------------------------------------------------------

    # Which of prune.py's targets (argparse dests: stage_pr, target_macs, target, density) it takes.
    targets: tuple[str, ...] = ()

    def target_refusal(self, flag: str) -> str:
        """The one line that refuses a target flag this method does not take."""
        return f"{self.name} does not take {flag}"

    def check_args(self, args) -> None:
        """Refuse (``UsageError``) what the command line gives that this method does not use."""

    def defaults(self, kind: str) -> dict:
        """Values of prune.py's shared flags left unset, for ``kind`` ('cifar' or 'imagenet') data."""
        return {}

    def run(self, job: Job) -> int:
        """Every phase of a prune.py run; returns the exit status."""
        raise NotImplementedError(f"{self.name} is not a prune.py method")


class Registry:
    """Methods by every spelling; iteration yields each spec once, in registration order."""

    def __init__(self):
        self._by_name: dict[str, MethodSpec] = {}
        self._specs: list[MethodSpec] = []

    def register(self, spec: MethodSpec, names: tuple[str, ...] | None = None) -> MethodSpec:
        for name in names or (spec.name, *spec.aliases):
            if name in self._by_name and self._by_name[name] is not spec:
                raise ValueError(f"two methods are called {name!r}")
            self._by_name[name] = spec
        if spec not in self._specs:
            self._specs.append(spec)
        return spec

    def get(self, name: str) -> MethodSpec:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def of_kind(self, kind: str) -> list[MethodSpec]:
        return [spec for spec in self._specs if spec.kind == kind]

    def names(self, kind: str) -> list[str]:
        """Every spelling of the methods of ``kind``."""
        return [name for name, spec in self._by_name.items() if spec.kind == kind]


METHODS = Registry()
register = METHODS.register
