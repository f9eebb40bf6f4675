r"""GReg-1 and GReg-2 (Wang et al., "Neural Pruning via Growing Regularization", ICLR 2021).

The regularisation phase on a pretrained dense network, as the authors' code
(MingSun-Tse/Regularization-Pruning) runs it; the cut and the fine-tuning that
follow are ``prune.py``'s, through the shared engine.

Every prunable layer l (a gated layer of ``models/structure.py``: ResNet56's
block conv1, ResNet50's conv1 and conv2, VGG's convs) has one coefficient per
filter, :math:`\lambda_{l,f} \ge 0` at first 0 (GReg's ``[N_out, N_in]`` matrix,
whose columns are all equal at filter granularity). After ``loss.backward()``

.. math:: \nabla W_{l,f} \mathrel{+}= \lambda_{l,f}\, W_{l,f}

(no factor 2, weights only, on top of the optimiser's weight decay: SGD, constant
lr ``--lr_prune``, momentum, the run's weight decay). The coefficients are
updated at iterations :math:`0, K_u, 2K_u, \dots` before that iteration's step:

- **magnitude ratio**, per layer: :math:`h = \bar s_{kept} / \bar s_{pruned}` of
  the filter scores :math:`s_f` = mean :math:`|W_f|`, as an EMA
  :math:`h \leftarrow 0.9 h + 0.1 \cdot ratio` (the first value is the ratio);
- **GReg-1**: the pruned set is fixed at the start (the lowest scores of the
  pretrained weights); each update :math:`\lambda_{pruned} \mathrel{+}= \delta_{prune}`
  (1e-4). A layer stops when its :math:`\max\lambda >` ``--reg_upper_limit`` (1)
  or when every pruning layer's :math:`h \ge` ``--mag_ratio_limit`` (1000);
- **GReg-2**: phase 1, :math:`\lambda \mathrel{+}= \delta_{pick}` (1e-5) on *every*
  filter of the layer, the ratio measured against the tentative set (the current
  lowest scores), until :math:`\max\lambda \ge` ``--reg_upper_limit_pick`` (1e-2):
  then the pruned set is picked by the current scores. Phase 2:
  :math:`\lambda_{pruned} \mathrel{+}= \delta_{prune}`, :math:`\lambda_{kept} = \delta_{recover}`
  (-1e-4, set each update); a layer stops when its own :math:`h \ge` 1000 or
  :math:`\max\lambda >` 1. The EMA carries over from phase 1, as in the code.

Layers with ratio 0 stop at once with :math:`\lambda = 0`; a stopped layer's
coefficients stay as they are. When every layer has stopped the coefficients
stay fixed for ``--stabilize_reg_interval`` (:math:`K_s`) more iterations; the
phase ends after the step of iteration (stop + :math:`K_s`). The coefficients are
float32, accumulate and are compared with the limits in float32 as in the code
(a float32 tensor against a Python number), so the counts match it exactly: GReg-1
exceeds 1 after 10,000 updates; GReg-2 picks at update 1,001 (1000 additions of
1e-5 fall just short of 0.01 in float32) and ends after 10,901.
"""
import math

import torch

from utils.cli import nonneg_int, positive_float, positive_int

from .method import PruningMethod
from .registry import register
from .selection import RatioMethod, decision, filter_scores, pick, pruned_count

# The regularisation phase continues only with the settings it started with.
GREG_SETTINGS = ("update_reg_interval", "stabilize_reg_interval", "reg_upper_limit", "reg_upper_limit_pick",
                 "reg_granularity_pick", "reg_granularity_prune", "reg_granularity_recover", "mag_ratio_limit",
                 "batch_size_prune", "lr_prune")
# The phase ends by its own rule; this only bounds the engine's epoch loop.
REGULARIZE_EPOCHS = 1_000_000


class GReg(PruningMethod):
    """The regularisation phase of GReg-1 (``variant=1``) or GReg-2 (``variant=2``)."""

    loss_name = "reg"
    ends_by_own_rule = True

    def __init__(self, model, ratios: list[float], variant: int, update_interval: int, stabilize_interval: int,
                 upper_limit: float = 1.0, upper_limit_pick: float = 1e-2, granularity_pick: float = 1e-5,
                 granularity_prune: float = 1e-4, granularity_recover: float = -1e-4, mag_ratio_limit: float = 1000.0,
                 pick_rule: str = "min", generator: torch.Generator | None = None):
        super().__init__(model)
        if variant not in (1, 2):
            raise ValueError(f"GReg has variants 1 and 2, not {variant}")
        self.name = f"greg{variant}"
        self.variant, self.ratios = variant, list(ratios)
        self.update_interval, self.stabilize_interval = update_interval, stabilize_interval
        self.upper_limit, self.upper_limit_pick, self.mag_ratio_limit = upper_limit, upper_limit_pick, mag_ratio_limit
        self.granularity_pick, self.granularity_prune = granularity_pick, granularity_prune
        self.granularity_recover = granularity_recover
        layers = model.gated_layers
        self.convs = [model.get_submodule(g.conv) for g in layers]
        device = self.convs[0].weight.device
        self.reg = [torch.zeros(g.width, device=device) for g in layers]
        # GReg-1 picks from the pretrained weights with --pick_pruned; GReg-2 picks later, always by 'min'.
        initial = decision(model, self.ratios, rule=pick_rule, generator=generator) if variant == 1 else None
        widths = [g.width for g in layers]
        self.pruned = [(z == 0).to(device) for z in initial.split(widths)] if initial is not None else \
            [torch.zeros(w, dtype=torch.bool, device=device) for w in widths]
        self.picked = [variant == 1 or r == 0 for r in self.ratios]
        self.hist = [None] * len(layers)
        self.finished_layers = [False] * len(layers)
        self.iteration = 0          # training steps taken in this phase
        self.updates = 0            # coefficient updates made
        self.picked_at = None       # GReg-2: the update at which the pruned sets were picked
        self.stopped_at = None      # the iteration at which every layer had stopped
        self.done = False

    # -- the loop's hooks ----------------------------------------------------------------------

    def changes_gradients(self) -> bool:
        return True

    def before_step(self, iteration: int) -> None:
        if self.stopped_at is None and self.iteration % self.update_interval == 0:
            self._update()

    @torch.no_grad()
    def after_backward(self) -> None:
        for conv, reg in zip(self.convs, self.reg):
            if conv.weight.grad is not None:
                conv.weight.grad.add_(reg.view(-1, *([1] * (conv.weight.dim() - 1))) * conv.weight)

    def after_step(self, iteration: int) -> None:
        if self.stopped_at is not None and self.iteration == self.stopped_at + self.stabilize_interval:
            self.done = True
        self.iteration += 1

    def finished(self) -> bool:
        return self.done

    # -- the coefficient update ----------------------------------------------------------------

    @torch.no_grad()
    def _update(self) -> None:
        self.updates += 1
        scores = filter_scores(self.model)
        for layer, (ratio, score) in enumerate(zip(self.ratios, scores)):
            if self.finished_layers[layer]:
                continue
            if ratio == 0:
                self.finished_layers[layer] = True
                continue
            if self.variant == 1:
                self.finished_layers[layer] = self._greg1(layer, score)
            else:
                self.finished_layers[layer] = self._greg2(layer, score)
        if all(self.finished_layers):
            self.stopped_at = self.iteration

    def _mag_ratio(self, layer: int, score: torch.Tensor, pruned: torch.Tensor) -> None:
        score = score.to(pruned.device)
        ratio = float(score[~pruned].mean() / score[pruned].mean()) if pruned.any() else float("inf")
        previous = self.hist[layer]
        self.hist[layer] = ratio if previous is None else 0.9 * previous + 0.1 * ratio

    def _greg1(self, layer: int, score: torch.Tensor) -> bool:
        pruned = self.pruned[layer]
        self._mag_ratio(layer, score, pruned)
        self.reg[layer][pruned] += self.granularity_prune
        every_layer_apart = all(h >= self.mag_ratio_limit for h in self.hist if h is not None)
        return every_layer_apart or bool(self.reg[layer].max() > self.upper_limit)

    def _greg2(self, layer: int, score: torch.Tensor) -> bool:
        reg, width = self.reg[layer], len(self.reg[layer])
        if not self.picked[layer]:
            reg += self.granularity_pick
            tentative = torch.zeros(width, dtype=torch.bool, device=reg.device)
            tentative[pick(score, pruned_count(width, self.ratios[layer])).to(reg.device)] = True
            self._mag_ratio(layer, score, tentative)
            if bool(reg.max() < self.upper_limit_pick):
                return False
            self.pruned[layer] = tentative
            self.picked[layer] = True
            self.picked_at = self.updates
            # The code checks the stop in the same call: a layer already apart stops at its pick.
            return self.hist[layer] >= self.mag_ratio_limit or bool(reg.max() > self.upper_limit)
        pruned = self.pruned[layer]
        reg[pruned] += self.granularity_prune
        reg[~pruned] = self.granularity_recover
        self._mag_ratio(layer, score, pruned)
        return self.hist[layer] >= self.mag_ratio_limit or bool(reg.max() > self.upper_limit)

    # -- what it decides, state, reporting -----------------------------------------------------

    @torch.no_grad()
    def channel_gates(self) -> torch.Tensor:
        """The pruned sets as gates (0 removed): GReg-1's from the start, GReg-2's once picked
        (before that, every channel is kept: nothing is decided yet)."""
        return torch.cat([(~p).float() if picked else torch.ones(len(p), device=p.device)
                          for p, picked in zip(self.pruned, self.picked)])

    def state_dict(self) -> dict:
        return dict(reg=[r.clone() for r in self.reg], pruned=[p.clone() for p in self.pruned],
                    picked=list(self.picked), hist=list(self.hist), finished_layers=list(self.finished_layers),
                    iteration=self.iteration, updates=self.updates, picked_at=self.picked_at,
                    stopped_at=self.stopped_at, done=self.done)

    def load_state_dict(self, state: dict) -> list[str]:
        device = self.reg[0].device
        self.reg = [r.to(device) for r in state["reg"]]
        self.pruned = [p.to(device) for p in state["pruned"]]
        self.picked, self.hist = list(state["picked"]), list(state["hist"])
        self.finished_layers = list(state["finished_layers"])
        self.iteration, self.updates = state["iteration"], state["updates"]
        self.picked_at, self.stopped_at, self.done = state["picked_at"], state["stopped_at"], state["done"]
        return []

    def _means(self) -> tuple[float, float, float]:
        """(mean coefficient of the pruned filters, of the kept ones, smallest magnitude ratio), over
        the layers that prune."""
        pruned = [r[p] for r, p, ratio in zip(self.reg, self.pruned, self.ratios) if ratio > 0 and p.any()]
        kept = [r[~p] for r, p, ratio in zip(self.reg, self.pruned, self.ratios) if ratio > 0]
        mean = lambda parts: float(torch.cat(parts).mean()) if parts else 0.0  # noqa: E731
        ratios = [h for h in self.hist if h is not None]
        return mean(pruned), mean(kept), min(ratios) if ratios else float("nan")

    def progress_scalars(self, progress: float) -> dict:
        pruned, kept, ratio = self._means()
        return {"greg/reg_pruned": pruned, "greg/reg_kept": kept, "greg/mag_ratio_min": ratio,
                "greg/layers_stopped": float(sum(self.finished_layers))}

    def log_epoch(self, writer, step: int, kept: list[int]) -> None:
        for layer, h, reg in zip(self.model.gated_layers, self.hist, self.reg):
            if h is not None:
                writer.add_scalar(f"greg/mag_ratio/{layer.name}", h, step)
            writer.add_scalar(f"greg/reg_max/{layer.name}", float(reg.max()), step)

    def results(self) -> dict:
        pruned, kept, ratio = self._means()
        return dict(method=self.name, pruning_phase=dict(
            iterations=self.iteration, updates=self.updates, picked_at_update=self.picked_at,
            stopped_at_iteration=self.stopped_at, done=self.done, reg_pruned_mean=pruned, reg_kept_mean=kept,
            mag_ratio=[h for h in self.hist], reg_max=[float(r.max()) for r in self.reg]))

    def updates_bound(self) -> int:
        """Updates after which every layer has stopped at the latest: the coefficients grow by
        ``--reg_granularity_prune`` per update up to ``--reg_upper_limit`` (GReg-2 first by
        ``--reg_granularity_pick`` up to ``--reg_upper_limit_pick``); the magnitude ratio may stop
        a layer sooner."""
        bound = math.ceil(self.upper_limit / self.granularity_prune) + 1
        if self.variant == 2:
            bound += math.ceil(self.upper_limit_pick / self.granularity_pick) + 1
        return bound

    def epoch_message(self, epoch: int, results: dict) -> str | None:
        pruned, kept, ratio = self._means()
        if self.done:
            state = "done"
        elif self.stopped_at is not None:
            left = self.stopped_at + self.stabilize_interval - self.iteration
            state = f"stabilising since iteration {self.stopped_at}, {left} iterations left"
        else:
            left = max(self.updates_bound() - self.updates, 0)
            state = (f"{sum(self.finished_layers)}/{len(self.finished_layers)} layers stopped; at most {left} more "
                     f"updates ({left * self.update_interval} iterations) and {self.stabilize_interval} stabilising "
                     f"iterations left")
        return (f"greg: iteration {self.iteration}, {self.updates} updates, {state}; coefficient pruned "
                f"{pruned:.3g} kept {kept:.3g}, smallest magnitude ratio {ratio:.3g}")


class GRegSpec(RatioMethod):
    """``prune.py --method greg1 / greg2``: the regularisation phase through the engine in
    ``<run>/regularize/`` (its pruned.pt is the cut network), then GReg's fine-tuning."""

    def __init__(self, variant: int):
        self.variant = variant
        self.name = f"greg{variant}"
        self.aliases = (f"GReg-{variant}",)
        self.summary = f"GReg-{variant} (Wang et al. 2021): growing regularisation, then the cut"

    def add_arguments(self, parser, **context) -> None:
        if "--update_reg_interval" in parser._option_string_actions:
            return  # GReg-1 and GReg-2 share one group
        g = parser.add_argument_group("GReg's regularisation phase (defaults: CIFAR / ImageNet)")
        g.add_argument("--update_reg_interval", type=positive_int, help="K_u: iterations between updates (10 / 5)")
        g.add_argument("--stabilize_reg_interval", type=nonneg_int,
                       help="K_s: iterations after the last stop (10000 / 40000)")
        g.add_argument("--reg_upper_limit", type=positive_float, default=1.0, help="a layer stops above this coefficient")
        g.add_argument("--reg_upper_limit_pick", type=positive_float, default=1e-2, help="GReg-2 picks at this coefficient")
        g.add_argument("--reg_granularity_pick", type=positive_float, default=1e-5, help="GReg-2's phase-1 increment")
        g.add_argument("--reg_granularity_prune", type=positive_float, default=1e-4, help="the pruned filters' increment")
        g.add_argument("--reg_granularity_recover", type=float, default=-1e-4, help="GReg-2's kept filters' coefficient")
        g.add_argument("--mag_ratio_limit", type=positive_float, default=1000.0, help="the magnitude-ratio stop")
        g.add_argument("--batch_size_prune", type=positive_int, help="batch of the regularisation phase (128 / 64)")
        g.add_argument("--lr_prune", type=positive_float, default=1e-3, help="constant SGD lr of the regularisation phase")

    def run(self, job) -> int:
        args = job.args
        target = self.plan(job)
        phase_dir = job.run_dir / "regularize"
        if not (job.run_dir / "last.pt").exists():
            config = job.config(self.settings + GREG_SETTINGS, batch_size=args.batch_size_prune, lr=args.lr_prune,
                                epochs=REGULARIZE_EPOCHS, out_dir=str(phase_dir))

            def method(model, config):
                generator = torch.Generator().manual_seed(config.seed)
                return GReg(model, args.layer_ratios, self.variant, args.update_reg_interval,
                            args.stabilize_reg_interval, args.reg_upper_limit, args.reg_upper_limit_pick,
                            args.reg_granularity_pick, args.reg_granularity_prune, args.reg_granularity_recover,
                            args.mag_ratio_limit, args.pick_pruned, generator)

            status = job.train(config, method, start=job.source, results_file="regularize.json",
                               extra_results=dict(phase="regularize", stage_pr=args.stage_pr,
                                                  target_macs=args.target_macs, layer_ratios=args.layer_ratios))
            if status != 0:
                return status
        phase = job.read_checkpoint(phase_dir / "last.pt")
        args.seed = phase["args"]["seed"]  # the run's, when continued
        extra = dict(self.results(args, target), pruning_phase=(phase["results"] or {}).get("pruning_phase"),
                     greg={key: getattr(args, key) for key in GREG_SETTINGS})
        return self.fine_tune(job, phase_dir / "pruned.pt", extra)


register(GRegSpec(1))
register(GRegSpec(2))
