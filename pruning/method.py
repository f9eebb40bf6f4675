"""The interface between a pruning method and the shared training loop.

The engine (``engine/trainer.py``) owns the model, the weights' SGD, the data,
checkpoints and resume, signals, logging, ``results.json``, evaluation, cost
accounting and export; it calls a method only through :class:`PruningMethod`.
One training step, in this order::

    method.before_step(iteration)             # e.g. GReg's coefficient update every K_u iterations
    output = model(images, **method.forward_args())
    loss = cross_entropy + method.loss(progress)
    loss.backward()
    method.after_backward()                   # e.g. GReg adds lambda * W to the gradients
    weights.step(); method's own optimisers step
    method.after_step(iteration)              # e.g. masks re-applied, Dep-L0's bounded pre-activations

and per epoch ``method.start_epoch(epoch)`` before it and ``method.end_epoch(epoch)``
after its last step, before the evaluation. ``method.finished()`` ends the run
early (a method whose phase ends by its own rule, not after a number of epochs).

What a method decides is expressed on the model's gated-layer records
(``models/structure.py``): :meth:`PruningMethod.channel_gates` is one value per
channel of every gated layer, 0 for a removed channel (L0 methods: the test
gates, which may also scale a channel). Cost, the ``channels`` figure,
``best.pt``'s comparison and the export read only that.
"""
import torch


class PruningMethod:
    """A method that prunes nothing: dense training, or fine-tuning a compact network.

    Subclasses override what they need; every hook has a do-nothing default, so a
    method is one small class and adding one touches no other.
    """

    name = "dense"
    # The column name of :meth:`loss` in the progress lines.
    loss_name = "reg"
    # What :meth:`network_key` compares, in words (results.json's ``best_top1_over``).
    network_name = "open channels"
    # True for a phase that ends when :meth:`finished` says so, not after its epochs (no run ETA).
    ends_by_own_rule = False

    def __init__(self, model):
        self.model = model

    # -- optimisation --------------------------------------------------------------------------

    def weight_parameters(self) -> list:
        """The parameters the engine's SGD trains (with weight decay)."""
        return self.model.weight_parameters()

    def attach_optimizer(self, optimizer) -> None:
        """Called once with the engine's weight optimiser (e.g. so masks can clear its momentum)."""

    def optimizers(self) -> dict:
        """The method's own optimisers, ``{name: (optimizer, scheduler or None)}``: stepped after the
        weights' in every step the method is active (:meth:`steps_optimizers`), schedulers after
        each epoch, all checkpointed."""
        return {}

    def steps_optimizers(self, epoch: int) -> bool:
        """Whether the method's optimisers step in ``epoch`` (0-based)."""
        return True

    def forward_args(self, epoch: int) -> dict:
        """Keyword arguments of the model's forward in a training step."""
        return {}

    def loss(self, progress: float) -> torch.Tensor | None:
        """The method's term of the training loss at ``progress`` epochs (None: no term)."""
        return None

    def changes_gradients(self) -> bool:
        """True if :meth:`after_backward` edits gradients (the engine unscales them first under AMP)."""
        return False

    # -- events ---------------------------------------------------------------------------------

    def start_epoch(self, epoch: int) -> None:
        """Before the first step of ``epoch`` (0-based), also when resuming into it."""

    def before_step(self, iteration: int) -> None:
        """Before the forward of global training step ``iteration`` (0-based, counted over epochs)."""

    def after_backward(self) -> None:
        """After ``backward()``, before any optimiser steps."""

    def after_step(self, iteration: int) -> None:
        """After every optimiser of step ``iteration`` has stepped."""

    def end_epoch(self, epoch: int) -> None:
        """After the last step of ``epoch`` (0-based), before it is evaluated and checkpointed."""

    def finished(self) -> bool:
        """True once the method's work is done and the run should end (checked after every step)."""
        return False

    def phase(self, epoch: int) -> str | None:
        """A label for ``epoch`` in the progress lines (e.g. ``fine-tune``), or None."""
        return None

    # -- what it decides -----------------------------------------------------------------------

    @torch.no_grad()
    def channel_gates(self) -> torch.Tensor:
        """One value per channel of every gated layer, 0 where the channel is removed."""
        return self.model.gates.test_gates()

    def network_key(self) -> torch.Tensor:
        """What identifies the network the method leaves now: ``best_top1`` and ``best.pt`` compare only
        epochs with equal keys (default: the open channels)."""
        return self.channel_gates() > 0

    def cost(self, kept: torch.Tensor) -> tuple[int, int]:
        """(MACs, params) of the network the method leaves, ``kept`` channels per gated layer."""
        return self.model.cost.pruned(kept)

    def sparse_layer_names(self) -> list[str]:
        """Layers whose weights are sparse (the export counts their non-zero weights); none by default."""
        return []

    def tied_values(self) -> dict:
        """Layers whose weights are tied to fewer free values, ``{name: free values}`` (the export counts
        those as their parameters); none by default."""
        return {}

    def non_finite_state(self) -> str | None:
        """What of the method's own state has gone non-finite, in words for the error line (e.g.
        ``'gate logit'``), or None. Checked with the loss at every progress line."""
        return None

    # -- state and reporting -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly, mid-phase included (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def progress_scalars(self, progress: float) -> dict:
        """TensorBoard scalars ``{tag: value}`` for a progress line at ``progress`` epochs."""
        return {}

    def log_epoch(self, writer, step: int, kept: list[int]) -> None:
        """Method-specific TensorBoard events of an evaluated epoch (``writer``: utils.logger.EventFile)."""

    def results(self) -> dict:
        """Keys this method adds to ``results.json`` (a dense network: ``net`` says so, as on every
        run of the training scripts)."""
        return dict(net="dense", back_dep=False)

    def epoch_message(self, epoch: int, results: dict) -> str | None:
        """A line for the console after ``epoch`` (0-based) has been evaluated (``results``: what
        results.json now says, :meth:`results` included; a method may add its findings about this
        epoch to it before it is saved), or None."""
        return None

